"""Judging a frozen encoder by control (the paper's headline evaluation): a flow-matching
policy on frozen features, trained from demonstrations and run in closed loop.

    environment.py      the small simulator interface; metaworld_env.py its Meta-World adapter
    demonstrations.py   scripted-expert episodes -> LeRobot (lerobot_writer.py) -> read back
    encoders.py         frozen encoders: state oracle, blind, CAIP (workdir, export, random, SigLIP 2), HF
    feature_cache.py    features of every demonstration frame, computed once
    cache.py            exact cache keys (SHA-256 of what made an entry), whole-or-nothing files
    dataset.py          rows of (features, state, instruction, action chunk), normalisation
    model.py, flow.py   the decoder-only transformer and its flow-matching head
    train.py            training on cached rows (optim, sharding, orbax); the acting policy
    rollout.py          closed-loop episodes with action chunking
    offline.py          held-out action error for robot data without a simulator
    evaluate.py, report.py   caip-policy-eval's loop and what it writes
    statistics.py       Wilson intervals and Fisher's exact test of success counts
"""
