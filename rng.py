"""Random streams addressed by what they are for, not by how many draws came before them.

Every random choice of a run is drawn from a stream whose seed is a stable hash of a key such as
(seed, experiment, iteration, outer step, class) or (seed, experiment, iteration, model, network). So the learned
set does not change when only the evaluation settings change (--num_eval, --eval_every, --eval_mode), a resumed run
needs no saved RNG state, and any number of processes draws the same numbers for the same purpose. The global RNG is
never the source of a result."""
import contextlib
import hashlib

import torch


def derive_seed(*key):
    """A 63-bit seed from a key of ints and strings: the same key gives the same seed on every machine and process
    (a cryptographic hash of its repr, unlike Python's salted hash())."""
    digest = hashlib.blake2b(repr(tuple(key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & (2 ** 63 - 1)


def generator(device, *key):
    """A torch.Generator on `device` seeded from the key."""
    return torch.Generator(torch.device(device)).manual_seed(derive_seed(*key))


def draw_int(gen, high=2 ** 31 - 1):
    """One integer in [0, high) from a CPU generator (e.g. the seed of a Siamese augmentation)."""
    return int(torch.randint(0, high, (1,), generator=gen))


@contextlib.contextmanager
def seeded(device, *key):
    """The global torch RNG seeded from the key inside the block, restored after it: for what draws from it by
    design, such as a network's default initialisation."""
    device = torch.device(device)
    devices = []
    if device.type == 'cuda':
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(*key))
        yield
