"""fairseq_kd: knowledge distillation of self-supervised speech models, as a fairseq plugin.

Install (see README): ``pip install torch==2.13.0`` first, then ``pip install .`` or ``-e .``.
Besides the packages, this installs ``fairseq_kd_compat.pth`` at the top of site-packages so that
fairseq 0.12.2 works on Python 3.11 / torch >= 2.6 from interpreter start-up (fairseq is imported
by its console scripts before any plugin could fix it).
"""

import json
import os
import shutil
import subprocess
import sys

from setuptools import find_namespace_packages, find_packages, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64: editable installs go through ``develop``
    editable_wheel = None

HERE = os.path.dirname(os.path.abspath(__file__))
PTH = "fairseq_kd_compat.pth"
HYDRA_PLUGIN = os.path.join("hydra_plugins", "fairseq_kd_searchpath")
SUPPORTED_TORCH = ">=2.6,<2.14"  # what the compatibility layer is tested against; 2.13.0 here
MAX_PIP = (24, 1)  # pip >= 24.1 rejects omegaconf 2.0.6's metadata (fairseq#5511)


# -- pre-flight checks: fail before any resolver or build work -----------------------------------
def _target_environment():
    """pip and torch versions of the environment being installed into.

    setup.py runs inside pip's isolated build environment, which hides the target's
    site-packages; a child interpreter without pip's PYTHONPATH overlay sees them again.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    env["FAIRSEQ_KD_COMPAT"] = "0"  # never import our own start-up hook while probing
    probe = (
        "import json, importlib.metadata as m\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({'pip': v('pip'), 'torch': v('torch')}))\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-I", "-c", probe], env=env, capture_output=True, text=True, timeout=60
        ).stdout
        return json.loads(out.strip().splitlines()[-1])
    except Exception:
        return {}


def _version_tuple(version):
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _preflight():
    if os.environ.get("FAIRSEQ_KD_SKIP_INSTALL_CHECKS") == "1":
        return
    found = _target_environment()
    pip_version = found.get("pip")
    if pip_version and _version_tuple(pip_version) >= MAX_PIP:
        sys.exit(
            f"fairseq_kd: pip {pip_version} cannot install fairseq 0.12.2 (pip >= 24.1 rejects the "
            "metadata of its omegaconf<2.1 dependency, fairseq#5511). Run\n"
            "    python -m pip install 'pip<24.1'\n"
            "then install again. (Set FAIRSEQ_KD_SKIP_INSTALL_CHECKS=1 to bypass this check.)"
        )
    torch_version = found.get("torch")
    if "torch" in found and torch_version is None:
        sys.exit(
            "fairseq_kd: torch is not installed in this environment. Install a pinned torch first, "
            "otherwise pip resolves the newest torch with several GB of CUDA packages:\n"
            "    python -m pip install torch==2.13.0     # CPU build here; or the CUDA build for your GPU\n"
            "then install fairseq_kd again. (FAIRSEQ_KD_SKIP_INSTALL_CHECKS=1 bypasses this check.)"
        )
    if torch_version and not ((2, 6) <= _version_tuple(torch_version) < (2, 14)):
        sys.exit(
            f"fairseq_kd: torch {torch_version} is installed, but fairseq_kd supports torch "
            f"{SUPPORTED_TORCH} (tested with 2.13.0). Run\n"
            "    python -m pip install torch==2.13.0\n"
            "then install again. (FAIRSEQ_KD_SKIP_INSTALL_CHECKS=1 bypasses this check.)"
        )


# -- ship the start-up .pth at the top of site-packages -------------------------------------------
class BuildPyWithPth(build_py):
    """Regular installs: put the .pth at the root of build_lib, which becomes site-packages."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=1):
        return list(super().get_outputs(include_bytecode)) + [os.path.join(self.build_lib, PTH)]


cmdclass = {"build_py": BuildPyWithPth}

if editable_wheel is not None:

    class EditableWheelWithPth(editable_wheel):
        """Editable installs (PEP 660): the unpacked wheel's root becomes site-packages."""

        def _run_build_commands(self, dist_name, unpacked_wheel, *args, **kwargs):
            result = super()._run_build_commands(dist_name, unpacked_wheel, *args, **kwargs)
            shutil.copy(os.path.join(HERE, PTH), os.path.join(unpacked_wheel, PTH))
            # hydra scans `hydra_plugins` with pkgutil, which cannot see through setuptools'
            # editable finder: the (tiny, stable) search-path plugin is installed as a real copy
            shutil.copytree(
                os.path.join(HERE, HYDRA_PLUGIN), os.path.join(unpacked_wheel, HYDRA_PLUGIN),
                ignore=shutil.ignore_patterns("__pycache__"),
            )
            return result

    cmdclass["editable_wheel"] = EditableWheelWithPth


if not {"sdist", "clean", "--help", "--version"} & set(sys.argv):
    _preflight()

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="fairseq_kd",
    version="0.1.0",
    description="Knowledge distillation of HuBERT / wav2vec 2.0 into small students, as a fairseq plugin",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fairseq_kd", "fairseq_kd.*", "fairseq_kd_compat"])
    # hydra discovers plugins in the `hydra_plugins` namespace package
    + find_namespace_packages(include=["hydra_plugins.*"]),
    include_package_data=True,
    package_data={"fairseq_kd": ["config/**/*.yaml", "config/*.yaml"]},
    install_requires=[
        f"torch{SUPPORTED_TORCH}",
        "fairseq==0.12.2",
        "numpy",
        "soundfile",  # fairseq's audio datasets read with it but do not declare it
        "editdistance",  # fairseq's CTC criterion and infer.py score with it, undeclared
        "sentencepiece",
        "omegaconf<2.1",  # fairseq 0.12.2's hydra-core 1.0.7 needs omegaconf 2.0.x
        "hydra-core<1.1",
        # Audio front-ends without torchaudio (its CPU wheel cannot load here, maintenance mode):
        # librosa for MFCCs (the field's standard), soxr for resampling (libsoxr, librosa's own).
        "librosa>=0.10",
        "soxr",
        "scikit-learn",  # k-means for HuBERT targets, as fairseq's simple_kmeans; EER via roc_curve
        "tqdm",
        "matplotlib",  # the main job's training-curve and similarity plots (PNG, Agg backend)
    ],
    extras_require={
        # + the "export" extra: tests/test_export.py checks ONNX parity with onnxruntime; wheels
        # only, ~7 s and ~120 MB to install (the env is ~1.1 GB), no torch requirement
        # + flashlight-text (the "lm" extra, a ~5 s wheel): tests/test_lm_decoding.py runs decode_kenlm's
        # beam search through fairseq's own KenLMDecoder
        # + the "hf" extra: tests/test_hf.py builds tiny transformers models (no downloads)
        "test": ["pytest", "flashlight-text", "onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18",
                 "transformers>=4.46", "safetensors"],
        # decode_kenlm (infer.py's KenLM lexicon beam search): flashlight's Python decoder, a wheel
        # that bundles KenLM; the kenlm module (an sdist, ~4 min to compile) is only for querying
        # or checking LMs from Python and is not needed by the decoder itself
        "lm": ["flashlight-text"],
        # fairseq-kd-export --onnx: torch's dynamo ONNX exporter needs onnx + onnxscript, the parity
        # and latency checks run onnxruntime (CPU)
        "export": ["onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18"],
        # transformers teachers (task.teacher_path=<folder with config.json>) and
        # fairseq-kd-export --format hf; tested with transformers 5.24.0 / safetensors 0.8.0 (pulls no
        # torch: it uses the one installed); the fairseq path never imports it
        "hf": ["transformers>=4.46", "safetensors"],
    },
    entry_points={
        "console_scripts": [
            "fairseq-kd-infer = fairseq_kd.cli.infer:main",
            "fairseq-kd-summary = fairseq_kd.cli.summary:main",
            "fairseq-kd-benchmark = fairseq_kd.cli.benchmark:main",
            "fairseq-kd-export = fairseq_kd.cli.export:main",
            "fairseq-kd-score = fairseq_kd.cli.score:main",
            "fairseq-kd-report = fairseq_kd.cli.report:main",
            "fairseq-kd-prepare-asr = fairseq_kd.cli.prepare_asr:main",
            "fairseq-kd-lexicon = fairseq_kd.cli.lexicon:main",
            "fairseq-kd-make-corpus = fairseq_kd.cli.mini_corpus:main",
            "fairseq-kd-mfcc-kmeans = fairseq_kd.cli.mfcc_kmeans:cli_main",
            "fairseq-kd-prepare-kws-sv = fairseq_kd.cli.prepare_kws_sv:main",
            "fairseq-kd-eval-kws-sv = fairseq_kd.cli.eval_kws_sv:main",
            "fairseq-kd-family = fairseq_kd.cli.family:main",
            "fairseq-kd-analyze = fairseq_kd.cli.analyze:main",
            "fairseq-kd-cluster-layers = fairseq_kd.cli.cluster_layers:main",
            "fairseq-kd-materialise = fairseq_kd.cli.materialise:main",
        ],
    },
    cmdclass=cmdclass,
    zip_safe=False,
)
