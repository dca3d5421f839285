"""The test model's features of a record set at random init, saved to an .npz; run by
test_features_multiprocess.py in one process and in two.

  python tests/extract_features_main.py RECORDS TOKENIZER OUT.npz WORKERS [COORDINATOR PROCESSES PROCESS_ID]
"""
import sys

import jax
import numpy as np


def main(records, tokenizer, out, workers, coordinator=None, processes=None, process_id=None):
    if coordinator:
        jax.distributed.initialize(coordinator, int(processes), int(process_id))
    import tiny_run_config
    from caip_jax.evaluate import features

    config = tiny_run_config.get_config()
    config.data.train, config.data.tokenizer = records, tokenizer
    encoder = features.initialised(config, seed=0)
    result = features.extract(encoder, records, batch_size=8, workers=int(workers))
    labels = result.pop("labels")
    np.savez(out, **result, **{f"label_{k}": v for k, v in labels.items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
