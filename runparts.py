"""The experiments a result file holds, and the parts of one run. A run split with --experiments over machines or
days, or stopped before its end, leaves several res_*.json files whose experiments add up to one table cell:
report.py shows the newest file of a cell joined with the files of the same run that hold its other experiments, and
--commands prints the line that runs what is still missing. Experiment k of a run is the same whichever part runs it
(every draw is addressed by (seed, k, ...)), so joined parts equal the run done at once."""
import glob
import os
import shlex

import experiment  # RESUME_KEYS: the flags a checkpoint checks; format_experiments: a part's name
from base import UserError, load_torch_file
from results import checkpoint_name, result_stem  # the one home of a run's file names

# The flags that make two result files parts of one run: those --resume checks, then those that shape the evaluation.
RUN_FLAGS = experiment.RESUME_KEYS + ('num_eval', 'epoch_eval_train', 'lr_net', 'batch_train', 'eval_mode',
                                      'eval_every', 'im_size', 'channels', 'dsa_eval', 'bf16')
# The flags of the line that continues a run: the same, and where its data is.
COMMAND_FLAGS = RUN_FLAGS + ('data_path',)


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def experiments_held(config):
    """The experiment indices whose accuracies a result file holds: its 'experiments_run' (written since
    --experiments exists), else the first experiments_done of a progress summary, else all num_exp."""
    run = config.get('experiments_run')
    if isinstance(run, list) and all(is_count(k) for k in run):
        return frozenset(run)
    for key in ('experiments_done', 'num_exp'):
        if is_count(config.get(key)):
            return frozenset(range(config[key]))
    return frozenset()


def same_run(a, b):
    """Two configs that differ at most in where and how fast they ran (folder, device, part, progress bars)."""
    return all(a.get(key) == b.get(key) for key in RUN_FLAGS)


def is_one_run(configs):
    """Several configs that are disjoint parts of one run."""
    seen = set()
    for config in configs:
        held = experiments_held(config)
        if not held or held & seen or not same_run(config, configs[0]):
            return False
        seen |= held
    return len(configs) > 1


def joined_config(configs):
    """The config of the parts joined: the first one's flags, with every part's experiments."""
    held = sorted(set().union(*(experiments_held(c) for c in configs)))
    return dict(configs[0], experiments_run=held, experiments_done=len(held))


def newest_run(records):
    """The newest run result file (by modification time; the path breaks ties), then the older files of the same run
    that hold other experiments, newest first. Not a run (a --load_syn evaluation, CL_DM.py): the newest alone."""
    ordered = sorted(records, key=lambda r: (r.mtime, r.path), reverse=True)
    chosen = ordered[:1]
    if not chosen or chosen[0].kind != 'run':
        return chosen
    held = set(experiments_held(chosen[0].config))
    for record in ordered[1:]:
        other = experiments_held(record.config)
        if record.kind == 'run' and other and not other & held and same_run(record.config, chosen[0].config):
            chosen.append(record)
            held |= other
    return chosen


def missing_experiments(records):
    """The experiments of range(num_exp) that none of the records holds."""
    num_exp = records[0].config.get('num_exp')
    if not is_count(num_exp):
        return []
    held = set().union(*(experiments_held(r.config) for r in records))
    return [k for k in range(num_exp) if k not in held]


def has_checkpoints(record):
    folder = os.path.dirname(record.path) or '.'
    return bool(glob.glob(os.path.join(glob.escape(folder), checkpoint_name(glob.escape(record.stem), '*'))))


def command_words(config):
    """['python', script, flags...]: the command line of a run rebuilt from its config (COMMAND_FLAGS only)."""
    script = 'main_DM.py' if config['method'] == 'DM' else 'main.py'
    words = ['python', script]
    for key in COMMAND_FLAGS:
        value = config.get(key)
        if value is None or value is False or (key == 'method' and script == 'main_DM.py'):  # main_DM.py is DM
            continue  # None: the flag was not given (main.py's dsa_strategy too)
        if isinstance(value, list):
            words += [f'--{key}'] + [str(v) for v in value]
        else:
            words += [f'--{key}'] if value is True else [f'--{key}', str(value)]
    return words


def continue_command(records):
    """The line that completes a run (records: newest_run's list), rebuilt from the run's own config; None when no
    experiment is missing. A single stopped file whose folder still holds its checkpoints continues with --resume
    into the same files; otherwise the missing experiments run as a part (--experiments) beside the others, still with
    --resume so that a checkpoint of theirs is used (the whole-dataset bound's keep its finished networks)."""
    missing = missing_experiments(records)
    if not missing:
        return None
    newest = records[0]
    config = newest.config
    words = command_words(config)
    plain_resume = len(records) == 1 and config.get('experiments') is None and has_checkpoints(newest)
    if not plain_resume:
        words += ['--experiments', experiment.format_experiments(missing)]
    words += ['--save_path', os.path.dirname(newest.path) or '.', '--resume']
    return shlex.join(words)


def cell_checkpoints(folders, method, dataset, model, ipc):
    """The checkpoints ckpt_<stem>_exp<E>.pt of one table cell under the folders (searched recursively, like the
    result files), newest first. The whole-dataset bound's stem carries whatever --ipc its run had (it does not use
    it), so any ipc matches there."""
    ipc_part = '*' if method == 'whole' else glob.escape(str(ipc))
    name = checkpoint_name(result_stem(*(glob.escape(str(p)) for p in (method, dataset, model)), ipc_part), '*')
    found = {os.path.normpath(p) for folder in folders
             for p in glob.glob(os.path.join(glob.escape(folder), '**', name), recursive=True)}
    return sorted(found, key=lambda p: (os.path.getmtime(p), p), reverse=True)


def stopped_run_commands(paths, warn):
    """The lines that continue runs whose only trace is a checkpoint (stopped inside the first experiment they ran,
    before any result file): each run's own command, rebuilt from the config its checkpoint keeps, with its own
    --experiments and --resume, so that it goes on into the same files rather than starting afresh over them (hours
    of a whole-bound network, say). One line per distinct run; a checkpoint that cannot be read is skipped with
    warn(message)."""
    lines = []
    for path in paths:
        try:
            config = load_torch_file(path, 'checkpoint').get('config')
        except UserError as e:
            warn(f'skipping {path}: {e}')
            continue
        if not isinstance(config, dict) or not all(isinstance(config.get(k), str) for k in ('method', 'dataset')):
            warn(f'skipping {path}: it holds no run config (not a checkpoint of this project)')
            continue
        words = command_words(config)
        if config.get('experiments') is not None:
            words += ['--experiments', str(config['experiments'])]
        words += ['--save_path', os.path.dirname(path) or '.', '--resume']
        line = shlex.join(words)
        if line not in lines:
            lines.append(line)
    return lines
