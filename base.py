"""What every layer needs: the user-facing error type, atomic file writing, safe loading of torch files,
devices, global seeding and logging. Imports nothing of the project, so every module can import it."""
import argparse
import json
import math
import os
import pickle
import random
import re
import tempfile

import numpy as np
import torch
from tqdm import tqdm


class UserError(Exception):
    """An error caused by the user's input or environment (missing data, unreadable file).

    The CLI scripts catch it and print only its message, so the message is forced onto a single
    line: it must say what is wrong and how to fix it.
    """

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors, so that a bad flag ends in one line like every other bad input.
    script: the name the message points to for --help."""

    def __init__(self, *args, script, **kwargs):
        super().__init__(*args, **kwargs)
        self.script = script

    def error(self, message):
        raise UserError(f'{message} (see python {self.script} --help)')


def short_error(exc, limit=200):
    """One-line description of an exception, for embedding in a UserError message."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def atomic_write(path, write_fn, mode="wb"):
    """Write through write_fn(file) into a temp file next to `path`, then rename it over `path`.

    The rename is atomic on POSIX, so an interrupted run never leaves a truncated file behind
    that a later run would mistake for a finished one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide results from colleagues
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def current_umask():
    """The process's umask, read from /proc/self/status (Linux >= 4.7) so nothing changes it. Elsewhere it is read
    by setting and restoring it with os.umask: a file another thread creates in between gets umask 0o077 (stricter,
    never looser); the project creates files from one thread."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def check_writable_folder(path, flag):
    """Create the folder `path` (a --save_path-like flag) if needed and check that a file can be written into it,
    so that a typo fails in one line before hours of work, not when the first result is written."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix='.write_check.')
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} folder '{path}' cannot be created or written ({e.strerror or short_error(e)}); "
                        f"give a folder you can write to") from e


def check_learning_rate(value, flag):
    """A learning rate must be a finite positive number: nan, inf, 0 or a negative one would only show as a NaN loss
    or a set that never moves."""
    if not (math.isfinite(value) and value > 0):
        raise UserError(f'{flag} must be a finite positive number, got {value}')


def save_torch_file_atomic(obj, path):
    """torch.save(obj) to `path` atomically (temp file in the same directory + os.replace)."""
    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def write_text_atomic(path, text):
    """Write the string `text` to `path` atomically, creating parent directories."""
    atomic_write(path, lambda f: f.write(text), "w")


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + '\n')


def _numpy_plain_globals():
    """(object, name) pairs of the numpy globals that result files of the original code hold: its accuracies are
    numpy.float64 scalars (np.sum(...) / n), pickled as numpy's scalar() of a dtype. Both module paths are listed:
    numpy 1 wrote numpy.core.multiarray, numpy 2 writes numpy._core.multiarray."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    pairs = [(scalar, 'numpy.core.multiarray.scalar'), (scalar, 'numpy._core.multiarray.scalar'), (np.dtype, 'numpy.dtype')]
    dtypes = getattr(np, 'dtypes', None)  # numpy >= 1.25: one class per dtype
    if dtypes is not None:
        pairs += [(getattr(dtypes, name), f'numpy.dtypes.{name}') for name in dir(dtypes) if name.endswith('DType')]
    return pairs


def _unsafe_global(exc):
    """The global a weights-only load refused (e.g. '__main__.Foo'), or None when the failure was something else."""
    match = re.search(r'GLOBAL ([\w.]+)', str(exc))
    return match.group(1) if match and isinstance(exc, pickle.UnpicklingError) else None


def load_torch_file(path, what, unsafe=False):
    """torch.load a user-supplied file onto the CPU, safely: weights-only unpickling (tensors, containers, numbers,
    strings) plus an allowlist of numpy scalars and dtypes, in the zip and in the legacy (torch < 1.6) format.
    unsafe=True (--unsafe_load) loads anything, executing what the file asks: only for files the user trusts.

    Every failure is a one-line UserError that says which it is: a missing file, a file that is not a torch file or
    is truncated, or a readable file that needs a Python global beyond the allowlist (named, with the flag)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"Cannot load the {what}: file {path} does not exist; check the path (or create the file first).")
    try:
        if unsafe:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_numpy_plain_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        needed = _unsafe_global(e)
        if unsafe and isinstance(e, (AttributeError, ImportError)):  # the file's objects need code we do not have
            raise UserError(f"Cannot load the {what} from {path}: it holds Python objects whose code is not "
                            f"available here ({short_error(e)}).") from e
        if needed is not None:
            raise UserError(
                f"Cannot load the {what} from {path} safely: it holds the Python object '{needed}', which is not plain "
                f"data (tensors, numbers, strings, numpy scalars); if you trust the file, rerun with --unsafe_load "
                f"(only for files you trust: loading may run code from the file).") from e
        raise UserError(
            f"Cannot load the {what} from {path}: it is not a torch file or it is truncated or corrupt "
            f"({short_error(e)}); re-create or re-download it.") from e


def check_choice(value, choices, what):
    if value not in choices:
        raise ValueError(f"unknown {what} '{value}'; valid choices: {', '.join(map(str, choices))}")
    return value


def get_device(name=None):
    """'cuda' when available, else 'cpu'; an explicit name is checked so a typo fails early."""
    if name in (None, '', 'auto'):
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device '{name}'; use cpu, cuda or cuda:N")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available on this machine; use --device cpu")
    return str(device)


def set_seed(seed):
    """Seed python, numpy and torch (CPU and every CUDA device). The only place the project seeds."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def log(args, msg):
    if not getattr(args, 'quiet', False):
        tqdm.write(msg)
