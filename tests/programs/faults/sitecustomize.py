"""Test-only fault injection, loaded by every Python process started with tests/programs/faults on PYTHONPATH
(helpers.fault_env).

LORA_DS_KILL_DURING="<rank>:<tag>:<file name>": when the process with RANK=<rank> writes <file name> of checkpoint
tag <tag> (or `latest` while it would name <tag>), it is killed with SIGKILL part-way: a DeepSpeed `.pt` file gets
half of its bytes, a file written through a rename never gets renamed. No handler, no cleanup runs.
"""

import os

_SPEC = os.environ.get("LORA_DS_KILL_DURING", "")
if _SPEC and os.environ.get("RANK") == _SPEC.split(":")[0]:
    import io
    import signal

    import torch

    _, _TAG, _NAME = _SPEC.split(":")

    def _die():
        os.kill(os.getpid(), signal.SIGKILL)

    def _is_target(path: str) -> bool:
        return os.path.basename(path) == _NAME and os.path.basename(os.path.dirname(path)) == _TAG

    _save, _replace = torch.save, os.replace

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and _is_target(os.fspath(f)):
            buffer = io.BytesIO()
            _save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            _die()
        return _save(obj, f, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        dst = os.fspath(dst)
        if _is_target(dst):
            _die()
        if os.path.basename(dst) == _NAME == "latest":
            with open(src) as f:
                if f.read().strip() == _TAG:
                    _die()
        return _replace(src, dst, *args, **kwargs)

    torch.save, os.replace = save, replace
