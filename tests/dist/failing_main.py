"""main.py with a failure injected into one process, for the failure tests under torchrun.

DC_TEST_FAIL_RANK (a rank, or 'all') and DC_TEST_FAIL_IT (an iteration) name where dc_iteration raises; the rest of
the command line is main.py's."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import main  # noqa: E402
import utils  # noqa: E402
from experiment import cli  # noqa: E402

real_iteration = utils.dc_iteration


def failing_iteration(*args, **kwargs):
    key = args[-1]  # (seed, experiment, iteration)
    which = os.environ['DC_TEST_FAIL_RANK']
    if (which == 'all' or int(os.environ['RANK']) == int(which)) and key[2] == int(os.environ['DC_TEST_FAIL_IT']):
        raise RuntimeError(f'injected failure on rank {os.environ["RANK"]} at iteration {key[2]}')
    return real_iteration(*args, **kwargs)


utils.dc_iteration = failing_iteration
if __name__ == '__main__':
    cli(lambda: main.main(sys.argv[1:]))
