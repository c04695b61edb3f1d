"""``fairseq-hydra-train`` that SIGKILLs itself at one chosen point of its checkpoint writing.

Usage: ``KILL_AT=EVENT:NAME python tests/kill_points.py <fairseq-hydra-train arguments>``

* ``save:checkpoint_1_4.pt``: while ``torch.save`` writes that checkpoint (its ``.tmp``), after
  half of its bytes are on disk;
* ``rename:checkpoint_1_4.pt``: right after the finished file got that name (before any copy);
* ``copy:checkpoint_1_4.pt`` / ``copy0:checkpoint_1_4.pt``: while that checkpoint is copied to
  ``checkpoint_last.pt`` (upstream) or its ``.tmp`` (with the ``checkpoint_resume`` fix), after
  half of the bytes / right after the destination was created empty.

Everything else is the console script itself (``fairseq_cli.hydra_train.cli_main``), run in this
process with the real compatibility layer, so the kill lands inside fairseq's own save path.
"""

import io
import os
import shutil
import signal
import sys

EVENT, NAME = os.environ["KILL_AT"].split(":", 1)


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def hook() -> None:
    import torch

    real_save, real_copyfile, real_rename, real_replace = torch.save, shutil.copyfile, os.rename, os.replace

    def save(obj, f, *args, **kwargs):
        name = os.path.basename(getattr(f, "name", "") or "")
        if EVENT == "save" and name == NAME + ".tmp":
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            die()
        return real_save(obj, f, *args, **kwargs)

    def copyfile(src, dst, *args, **kwargs):
        if EVENT in ("copy", "copy0") and os.path.basename(str(src)) == NAME:
            with open(src, "rb") as s, open(dst, "wb") as d:
                if EVENT == "copy":
                    data = s.read()
                    d.write(data[: len(data) // 2])
                d.flush()
            die()
        return real_copyfile(src, dst, *args, **kwargs)

    def renamer(real):
        def rename(src, dst, *args, **kwargs):
            result = real(src, dst, *args, **kwargs)
            if EVENT == "rename" and os.path.basename(str(dst)) == NAME:
                die()
            return result

        return rename

    torch.save, shutil.copyfile = save, copyfile
    os.rename, os.replace = renamer(real_rename), renamer(real_replace)


if __name__ == "__main__":
    hook()
    from fairseq_cli.hydra_train import cli_main

    sys.argv[0] = "fairseq-hydra-train"
    sys.exit(cli_main())
