"""t5x_lite: pretrain, fine-tune, post-train and evaluate Transformers in JAX/Flax."""

import setuptools

setuptools.setup(
    name='t5x_lite',
    version='0.1.0',
    description='Pretrain, fine-tune, post-train and evaluate Transformer language models '
                'in JAX/Flax, TPU-first and tested on CPU.',
    python_requires='>=3.11',
    # The task registry lives in tasks/ at the top of the repo and installs as
    # t5x_lite.tasks (no top-level `tasks` module, which would shadow a user's own).
    packages=(setuptools.find_packages(include=['t5x_lite', 't5x_lite.*'])
              + ['t5x_lite.tasks']),
    package_dir={'t5x_lite.tasks': 'tasks'},
    package_data={'t5x_lite.data': ['vocab/*.model', 'vocab/*.txt']},
    install_requires=[
        'jax>=0.10.2,<0.11',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'seqio>=0.0.20,<0.1',
        'tensorflow>=2.21,<2.22',
        'tensorflow-text>=2.21,<2.22',
        'tensorflow-datasets>=4.9.10,<5',
        'sentencepiece>=0.2.0,<0.3',
        'gin-config>=0.5.0,<0.6',
        'tensorboard>=2.20,<2.22',
        'tqdm>=4.66',
        'numpy>=2.0',
        'safetensors>=0.8.0,<0.9',
        # Hugging Face tokenizer directories as seqio vocabularies (data.hf_vocab).
        'tokenizers>=0.23.3,<0.24',
        'ml_dtypes>=0.6.0',
        # GLUE / SuperGLUE metrics (Matthews, F1, Pearson, Spearman).
        'scikit-learn>=1.5,<2',
        'scipy>=1.13',
        # ROUGE-L for instruction evaluation and the Self-Instruct duplicate filter.
        'rouge-score>=0.1.2,<0.2',
        # BLEU for translation (T5's settings: intl tokenizer, exp smoothing).
        'sacrebleu>=2.4,<3',
    ],
    extras_require={
        # Reference implementations for the parity tests (CPU wheel of torch).
        # importlib_resources: TFDS needs it to write the small datasets tests prepare.
        'test': ['pytest>=8', 'pytest-xdist>=3', 'torch==2.13.0', 'transformers>=5,<6',
                 'peft>=0.21,<1', 'importlib_resources'],
        # libtpu, as jax[tpu] 0.10.2 pins it: runs on TPU VMs, and on any host
        # describes TPU slices for `python -m t5x_lite.precompile`.
        'tpu': ['libtpu==0.0.42.*'],
    },
)
