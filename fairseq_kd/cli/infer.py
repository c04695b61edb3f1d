"""``fairseq-kd-infer``: fairseq's own ``examples/speech_recognition/new/infer.py``, runnable.

The pip package ships fairseq's examples as ``fairseq/examples`` but infer.py imports them as a
top-level ``examples`` package. We alias that package (never putting ``site-packages/fairseq`` on
``sys.path``: ``fairseq/logging`` would shadow the standard library) and run infer.py as
``__main__`` with the same command line, e.g.::

    fairseq-kd-infer --config-dir $(fairseq-kd-infer --conf-dir) --config-name infer \\
        task=audio_finetuning task.data=manifests common_eval.path=checkpoint_best.pt \\
        dataset.gen_subset=valid decoding.type=viterbi
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from types import ModuleType

from fairseq_kd.cli.errors import clean_errors


def alias_fairseq_examples() -> ModuleType:
    """Make ``import examples...`` resolve to fairseq's bundled examples tree."""
    spec = importlib.util.find_spec("fairseq")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fairseq is not installed; see the README's install step")
    examples_dir = os.path.join(list(spec.submodule_search_locations)[0], "examples")
    loaded = sys.modules.get("examples")
    # fairseq's own `import examples.simultaneous_translation` attempt can leave another folder
    # named examples (this repository's, when it is on sys.path) in sys.modules: replace that one
    if loaded is not None and examples_dir in list(getattr(loaded, "__path__", [])):
        return loaded
    init = os.path.join(examples_dir, "__init__.py")
    if not os.path.isfile(init):
        raise ImportError(f"fairseq's examples tree is missing ({init}); reinstall fairseq==0.12.2")
    examples_spec = importlib.util.spec_from_file_location(
        "examples", init, submodule_search_locations=[examples_dir]
    )
    module = importlib.util.module_from_spec(examples_spec)
    sys.modules["examples"] = module
    examples_spec.loader.exec_module(module)
    return module


def infer_conf_dir() -> str:
    """Folder of infer.py's own yaml configs (``infer.yaml``)."""
    examples = alias_fairseq_examples()
    return os.path.join(list(examples.__path__)[0], "speech_recognition", "new", "conf")


def uses_flashlight(argv: list[str]) -> bool:
    """Whether the command line asks for one of infer.py's flashlight beam-search decoders."""
    types = [a.split("=", 1)[1] for a in argv if a.startswith("decoding.type=")]
    if types:  # an explicit decoding.type overrides the config's
        return types[-1] in ("kenlm", "fairseqlm")
    names = [b for a, b in zip(argv, argv[1:]) if a in ("--config-name", "-cn")]
    names += [a.split("=", 1)[1] for a in argv if a.startswith("--config-name=")]
    return "decode_kenlm" in names


def check_flashlight(argv: list[str]) -> None:
    """fairseq only warns when flashlight is missing and fails later with a bare NameError."""
    if not uses_flashlight(argv):
        return
    try:
        import flashlight.lib.text.decoder  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            f"error: KenLM / fairseq-LM decoding needs flashlight's Python decoder ({error}): "
            "pip install flashlight-text   (or: pip install 'fairseq_kd[lm]'); "
            "decode_viterbi needs nothing extra"
        ) from None


# infer.py runs inside hydra.run.dir (decode_*.yaml: the results folder), so relative paths on
# the command line would be read from, and results written below, that folder
RESULTS_PATH_KEYS = ("decoding.results_path", "common_eval.results_path")


def absolute_paths(argv: list[str], launch_dir: str) -> list[str]:
    """``key=value`` overrides of input paths that exist, and of the results folder, made absolute."""
    from fairseq_kd_compat.fixes import INPUT_PATH_KEYS

    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+~")
        if sep and value and not key.startswith("-") and not os.path.isabs(value):
            if bare in RESULTS_PATH_KEYS:
                arg = f"{key}={os.path.join(launch_dir, value)}"
            elif bare in INPUT_PATH_KEYS:
                parts = [
                    os.path.join(launch_dir, p) if p and os.path.exists(os.path.join(launch_dir, p)) else p
                    for p in value.split(os.pathsep)
                ]
                arg = f"{key}={os.pathsep.join(parts)}"
        out.append(arg)
    return out


@clean_errors
def main() -> None:
    if sys.argv[1:] == ["--conf-dir"]:
        print(infer_conf_dir())
        return
    check_flashlight(sys.argv[1:])
    sys.argv[1:] = absolute_paths(sys.argv[1:], os.getcwd())
    alias_fairseq_examples()
    # As ``python infer.py``: hydra then resolves infer.py's own ``conf`` folder from its file.
    sys.argv[0] = "infer.py"
    runpy.run_module("examples.speech_recognition.new.infer", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
