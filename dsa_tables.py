"""The DSA paper's Tables 2-5 (SPEC §9b) from our runs' JSON summaries, beside the paper's numbers, with the command
lines of the cells without a result; and the DD-Ranking style columns of the runs table (gain over random real
images evaluated the same way, gap to the whole dataset). Built on tables.py: its records, cells and rendering.

A cell reads the runs that match its setting in their config (method, --dsa_strategy, --dsa_condense, --dsa_eval,
--init, model, ipc); the paper's number is only ever printed in brackets beside it."""
import os
import shlex

from tables import (OFF_MARK, TABLE_NAMES, ReportError, Table, build_tables, choice_note,
                    choose_records, dataset_rank, dsa_strategy_for, format_cell, format_cell_with_paper,
                    format_paper, group_by, make_cell, missing_commands, own_result, paper_value, table1_cells,
                    table1_command, table1_key, table1_model, with_save_path)
from training import eval_settings
from utils import EVAL_POOLS

DSA_TABLE_NAMES = ('table2', 'table3', 'table4', 'table5')
ALL_TABLE_NAMES = ('table1', *DSA_TABLE_NAMES, *[n for n in TABLE_NAMES if n != 'table1'])

# ---------------------------------------------------------------------------------------------
# The paper's numbers (SPEC §9b): (mean, std) in %
# ---------------------------------------------------------------------------------------------

TABLE2_DATASET = 'CIFAR100'
TABLE2_METHODS = ('random', 'herding', 'LD', 'DC', 'DSA', 'whole')
TABLE2_IPCS = (1, 10)
TABLE2_LD = {1: 11.5}  # LD (learning by distillation) has no implementation here: its cells stay empty
TABLE2_STDS = {'DC': (0.3, 0.3), 'DSA': (0.3, 0.3), 'whole': (0.3, 0.3)}  # the stds SPEC §9b gives for Table 2

TABLE3_SETTING = ('MNIST', 1)
TABLE3_MODELS = tuple(EVAL_POOLS['M'])  # MLP, ConvNet, LeNet, AlexNet, VGG11, ResNet18: the paper's order
TABLE3_PAPER = {  # row: the network the set is learned with (C); columns: the network trained on it (T)
    'MLP': ((76.5, 1.2), (73.1, 3.6), (80.4, 2.9), (78.2, 6.4), (58.7, 6.5), (78.7, 3.9)),
    'ConvNet': ((75.6, 1.1), (88.8, 0.8), (84.8, 1.5), (84.7, 1.5), (83.5, 1.7), (89.3, 0.8)),
    'LeNet': ((76.5, 0.9), (86.6, 1.5), (83.9, 1.6), (83.9, 1.2), (81.1, 2.3), (88.2, 0.9)),
    'AlexNet': ((76.1, 0.8), (87.6, 0.8), (84.2, 1.6), (84.6, 1.7), (82.0, 2.1), (88.8, 0.8)),
    'VGG11': ((75.8, 1.0), (88.9, 0.7), (84.5, 1.6), (85.0, 1.4), (83.2, 1.9), (88.9, 1.0)),
    'ResNet18': ((75.8, 1.0), (88.6, 0.8), (84.8, 1.7), (84.8, 1.2), (82.4, 1.9), (89.5, 1.0)),
}

TABLE4_SETTING = ('CIFAR10', 10)
TABLE4_STRATEGIES = ('crop', 'flip', 'scale', 'rotate')
# row -> (condense real, condense synthetic, test synthetic) as the paper writes them, --dsa_condense, --dsa_eval
TABLE4_ROWS = {
    'Ours': (('A_w', 'A_w', 'A'), 'siamese', 1),
    '(A)': (('–', '–', '–'), 'none', 0),
    '(B)': (('–', '–', 'A'), 'none', 1),
    '(C)': (('A', '–', 'A'), 'real', 1),
    '(D)': (('–', 'A', 'A'), 'syn', 1),
    '(E)': (('A_w', 'A_w', '–'), 'siamese', 0),
    '(F)': (('A', 'A', 'A'), 'independent', 1),
}
TABLE4_PAPER = {  # Crop, Flip, Scale, Rotation
    'Ours': ((49.1, 0.6), (47.9, 0.7), (46.9, 0.5), (46.8, 0.6)),
    '(A)': ((45.5, 0.6),) * 4,
    '(B)': ((46.9, 0.6), (46.1, 0.6), (45.7, 0.5), (45.0, 0.5)),
    '(C)': ((42.8, 0.7), (46.2, 0.6), (44.5, 0.6), (44.5, 0.6)),
    '(D)': ((44.6, 0.7), (46.8, 0.6), (45.4, 0.6), (45.9, 0.7)),
    '(E)': ((43.4, 0.5), (46.4, 0.6), (45.7, 0.6), (46.3, 0.5)),
    '(F)': ((44.5, 0.5), (46.9, 0.6), (45.7, 0.5), (45.8, 0.5)),
}

TABLE5_IPC = 10
TABLE5_COLUMNS = ('none', 'color', 'crop', 'cutout', 'flip', 'scale', 'rotate', 'combination')
TABLE5_PAPER = {  # None: the paper has no such cell (digits are not flipped)
    'MNIST': ((96.4, 0.1), (96.5, 0.1), (97.2, 0.1), (96.5, 0.1), None, (97.2, 0.1), (97.2, 0.1), (97.8, 0.1)),
    'FashionMNIST': ((82.5, 0.3), (82.9, 0.3), (83.3, 0.3), (84.0, 0.3), (83.1, 0.2), (84.0, 0.4), (83.1, 0.3),
                     (84.6, 0.3)),
    'SVHN': ((76.7, 0.6), (77.4, 0.5), (75.9, 0.8), (73.1, 0.6), None, (78.0, 0.5), (77.4, 0.4), (79.2, 0.5)),
    'CIFAR10': ((45.5, 0.6), (47.6, 0.5), (49.1, 0.6), (48.1, 0.5), (47.9, 0.7), (46.9, 0.5), (46.8, 0.6),
                (52.1, 0.5)),
}
NO_FLIP_DATASETS = ('MNIST', 'SVHN')

# Paper-setting command lines: the README's Table 4 section uses the same flags.
TABLE45_COMMAND = 'python main.py --dataset {dataset} --model ConvNet --ipc {ipc} --init real --method DSA'
PAPER_REPEATS = ' --num_exp 5 --num_eval 5'


# ---------------------------------------------------------------------------------------------
# Which setting a run is
# ---------------------------------------------------------------------------------------------

def strategy_of(record):
    strategy = record.config.get('dsa_strategy')
    return None if strategy in (None, '', 'none', 'None') else strategy


def condense_mode(record):
    return record.config.get('dsa_condense', 'siamese')


def dsa_eval_of(record):
    return int(record.config.get('dsa_eval', 1))


def learns_without_augmentation(record):
    """DC, or DSA without a strategy or with --dsa_condense none."""
    return record.method == 'DC' or (record.method == 'DSA' and (strategy_of(record) is None
                                                                 or condense_mode(record) == 'none'))


def evaluation_protocol(record, model_eval):
    """(DSA strategy, DC strategy, epochs) the run trained its model_eval networks with (training.eval_settings)."""
    config = record.config
    return eval_settings(record.method, record.dataset, model_eval, config.get('dsa_strategy'),
                         config.get('epoch_eval_train'), config.get('default_epoch_eval', 300),
                         bool(dsa_eval_of(record)))


def is_plain_convnet_run(record):
    """A learning run of the paper's network, from real images, with its own accuracy recorded."""
    return (record.kind == 'run' and record.model == table1_model(record.dataset)
            and record.config.get('init') == 'real' and own_result(record) is not None)


def no_augmentation_anywhere(record):
    """Row (A) of Table 4 / column 'none' of Table 5: nothing augmented while learning nor in evaluation (DC with
    real init, unless its evaluation rule augments, as on MNIST)."""
    return learns_without_augmentation(record) and evaluation_protocol(record, own_model(record))[:2] == (None, None)


def own_model(record):
    return next(m for m in record.results if record.results[m] is own_result(record))


def table4_key(record):
    """(dataset, ipc, row, strategy) of a Table 4 run; row (A) does not depend on the strategy: strategy None."""
    if not is_plain_convnet_run(record) or record.method not in ('DC', 'DSA'):
        return None
    if no_augmentation_anywhere(record):
        return record.dataset, record.ipc, '(A)', None
    strategy = strategy_of(record)
    if record.method != 'DSA' or strategy not in TABLE4_STRATEGIES:
        return None
    for row, (_, condense, dsa_eval) in TABLE4_ROWS.items():
        if row != '(A)' and condense == condense_mode(record) and dsa_eval == dsa_eval_of(record):
            return record.dataset, record.ipc, row, strategy
    return None


def table5_column(record):
    """The Table 5 column of a run: 'none', one op, or 'combination' (the dataset's strategy), Siamese while learning
    and DSA in evaluation; None for any other run."""
    if not is_plain_convnet_run(record) or record.method not in ('DC', 'DSA'):
        return None
    if no_augmentation_anywhere(record):
        return 'none'
    if record.method != 'DSA' or condense_mode(record) != 'siamese' or dsa_eval_of(record) != 1:
        return None
    strategy = strategy_of(record)
    if strategy == dsa_strategy_for(record.dataset):
        return 'combination'
    return strategy if strategy in TABLE5_COLUMNS else None


def is_standard_dsa(record):
    """DSA as in the paper's Table 1: the dataset's strategy, Siamese while learning, DSA in evaluation."""
    return (record.kind in ('run', 'eval') and record.method == 'DSA' and condense_mode(record) == 'siamese'
            and dsa_eval_of(record) == 1 and strategy_of(record) == dsa_strategy_for(record.dataset))


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def cell_of(records, pool, model_eval=None):
    """Cell of the newest (or pooled) records: their own model's accuracies, or model_eval's."""
    chosen = choose_records(records, pool)
    pairs = [((own_result(r) if model_eval is None else r.results.get(model_eval)), r.config) for r in chosen]
    return make_cell([p for p in pairs if p[0] is not None])


def cell_beside_paper(cell, paper, at_paper_setting):
    """Ours with the paper's value in brackets; the off-paper mark only where the run is the paper's setting."""
    if at_paper_setting:
        return format_cell_with_paper(cell, paper)
    return f'{format_cell(cell)} {format_paper(paper)}'


def setting_note(setting, at_paper):
    dataset, ipc = setting
    if at_paper:
        return (f'{OFF_MARK}: more than the allowed number of paper-stds from the paper (tables.is_off_paper, as '
                f'Table 1).')
    return (f'The paper measured {dataset} at ipc {ipc}; its numbers are shown in brackets for reference only '
            f'(another setting), so no cell is marked.')


def title_suffix(pool):
    return ' (pooled runs)' if pool else ' (newest run per cell)'


def settings_of(groups):
    """The (dataset, ipc) settings of grouped keys, in the papers' dataset order."""
    return sorted({k[:2] for k in groups}, key=lambda s: (dataset_rank(s[0]), s[1]))


def of_setting(groups, setting):
    return {k: v for k, v in groups.items() if k[:2] == setting}


def build_table2(records, pool):
    cells, groups = table1_cells(records, pool)
    if not any(key[0] == TABLE2_DATASET for key in cells):
        return []
    rows = []
    for method in TABLE2_METHODS:
        row = [method]
        for ipc in TABLE2_IPCS:
            cell = cells.get((TABLE2_DATASET, None if method == 'whole' else ipc, method))
            row.append(format_cell_with_paper(cell, table2_paper(method, ipc)))
        rows.append(row)
    notes = ['CIFAR100, ConvNet: test accuracy (%), ours as mean ± std (experiments×networks, or n), the paper\'s in '
             'brackets (SPEC §9b). whole ignores ipc. LD has no implementation in this project.',
             setting_note((TABLE2_DATASET, None), True),
             choice_note({k: v for k, v in groups.items() if k[0] == TABLE2_DATASET}, pool, 'cell')]
    return [Table('table2', 'Table 2 (DSA paper): CIFAR100' + title_suffix(pool), ['method', 'ipc 1', 'ipc 10'], rows,
                  notes)]


def table2_paper(method, ipc):
    """(mean, std or None): the Table 1 numbers (tables.paper_value), Table 2's stds where tables has none."""
    if method == 'LD':
        return (TABLE2_LD[ipc], None) if ipc in TABLE2_LD else None
    paper = paper_value(method, TABLE2_DATASET, ipc)
    if paper is None:
        return None
    std = paper[1] if paper[1] is not None else TABLE2_STDS.get(method, (None, None))[TABLE2_IPCS.index(ipc)]
    return paper[0], std


def table3_key(record):
    if not is_standard_dsa(record) or record.model not in TABLE3_MODELS:
        return None
    return record.dataset, record.ipc, record.model


def build_table3(records, pool):
    groups = group_by(records, table3_key)
    tables = []
    for setting in settings_of(groups):
        at_paper = setting == TABLE3_SETTING
        rows = []
        for learned_with in TABLE3_MODELS:
            runs = groups.get((*setting, learned_with), [])
            row = [learned_with]
            for k, trained in enumerate(TABLE3_MODELS):
                cell = cell_of(runs, pool, trained) if runs else None
                row.append(cell_beside_paper(cell, TABLE3_PAPER[learned_with][k], at_paper))
            rows.append(row)
        notes = ['Cross-architecture, DSA (the dataset\'s strategy, Siamese, DSA in evaluation): rows = the network '
                 'the set was learned with (C), columns = the network trained on it (T); ours, the paper\'s (MNIST '
                 'ipc 1, SPEC §9b) in brackets.', setting_note(TABLE3_SETTING, at_paper),
                 choice_note(of_setting(groups, setting), pool, 'row')]
        tables.append(Table('table3', f'Table 3 (DSA paper): cross-architecture, {setting[0]} ipc {setting[1]}'
                            + title_suffix(pool), ['C \\ T', *TABLE3_MODELS], rows, notes))
    return tables


def build_table4(records, pool):
    groups = group_by(records, table4_key)
    tables = []
    for setting in settings_of(groups):
        at_paper = setting == TABLE4_SETTING
        rows = []
        for row_name, (paper_cols, condense, dsa_eval) in TABLE4_ROWS.items():
            row = [row_name, *paper_cols, condense, str(dsa_eval)]
            for k, strategy in enumerate(TABLE4_STRATEGIES):
                runs = groups.get((*setting, row_name, None if row_name == '(A)' else strategy), [])
                row.append(cell_beside_paper(cell_of(runs, pool) if runs else None, TABLE4_PAPER[row_name][k],
                                             at_paper))
            rows.append(row)
        notes = ['One augmentation at a time (--dsa_strategy = the column), ConvNet, real init. A_w: one Siamese draw '
                 'for the real and the synthetic batch; A: independent draws; –: none. Row (A) augments nothing, so '
                 'one run (DC with real init, or DSA with --dsa_condense none --dsa_eval 0) fills its four columns.',
                 setting_note(TABLE4_SETTING, at_paper),
                 choice_note(of_setting(groups, setting), pool, 'cell')]
        header = ['row', 'condense real', 'condense synthetic', 'test synthetic', '--dsa_condense', '--dsa_eval',
                  'Crop', 'Flip', 'Scale', 'Rotation']
        tables.append(Table('table4', f'Table 4 (DSA paper): ablation, {setting[0]} ipc {setting[1]}'
                            + title_suffix(pool), header, rows, notes))
    return tables


def build_table5(records, pool):
    groups = group_by(records, lambda r: (r.dataset, r.ipc, table5_column(r)) if table5_column(r) else None)
    rows = []
    for dataset, ipc in settings_of(groups):
        at_paper = ipc == TABLE5_IPC and dataset in TABLE5_PAPER
        paper_row = TABLE5_PAPER.get(dataset, (None,) * len(TABLE5_COLUMNS))
        row = [dataset, str(ipc)]
        for k, column in enumerate(TABLE5_COLUMNS):
            runs = groups.get((dataset, ipc, column), [])
            cell = cell_of(runs, pool) if runs else None
            row.append(cell_beside_paper(cell, paper_row[k], at_paper) if (cell or paper_row[k]) else '–')
        rows.append(row)
    if not rows:
        return []
    notes = ['DSA with one op (--dsa_strategy = the column), all of the dataset\'s ops (combination: '
             f'{dsa_strategy_for("CIFAR10")}; no flip on MNIST and SVHN) or none (nothing augmented anywhere), '
             'Siamese while learning, DSA in evaluation, ConvNet, real init; the paper\'s (ipc 10, SPEC §9b) in '
             'brackets.',
             f'{OFF_MARK} only on rows at the paper\'s ipc {TABLE5_IPC}; rows at another ipc show the paper\'s ipc-10 '
             f'numbers for reference only.',
             choice_note(groups, pool, 'cell')]
    return [Table('table5', 'Table 5 (DSA paper): augmentation strategies' + title_suffix(pool),
                  ['dataset', 'ipc', *TABLE5_COLUMNS], rows, notes)]


# ---------------------------------------------------------------------------------------------
# DD-Ranking style columns of the runs table
# ---------------------------------------------------------------------------------------------

def ranking_references(records, pool):
    """(random cells keyed by (dataset, ipc, eval model, protocol), whole cells keyed by (dataset, eval model))."""
    randoms, wholes = {}, {}
    for record in records:
        if record.kind != 'run':
            continue
        for model in record.results:
            if record.method == 'random':
                key = (record.dataset, record.ipc, model, evaluation_protocol(record, model))
                randoms.setdefault(key, []).append(record)
            elif record.method == 'whole':
                wholes.setdefault((record.dataset, model), []).append(record)
    return ({k: cell_of(v, pool, k[2]) for k, v in randoms.items()},
            {k: cell_of(v, pool, k[1]) for k, v in wholes.items()})


def signed(value):
    return f'{value:+.1f}'


def add_ranking_columns(table, records, pool):
    """Two columns for learned sets (DC, DSA, DM): the gain over random real images of the same ipc trained with the
    same evaluation protocol (augmentation and epochs), and the gap to the whole training set, in points."""
    randoms, wholes = ranking_references(records, pool)
    order = sorted((r for r in records if r.kind != 'cl'), key=lambda r: r.path)
    pairs = [(r, m) for r in order for m in r.results]  # the rows of tables.build_runs, in its order
    if len(pairs) != len(table.rows):
        raise ReportError('internal: the runs table does not list one row per (file, eval model)')
    for row, (record, model) in zip(table.rows, pairs):
        gain = gap = '–'
        if record.method in ('DC', 'DSA', 'DM'):
            ours = record.results[model]['mean']
            random_cell = randoms.get((record.dataset, record.ipc, model, evaluation_protocol(record, model)))
            whole_cell = wholes.get((record.dataset, model))
            gain = signed(ours - random_cell.mean) if random_cell else '–'
            gap = signed(whole_cell.mean - ours) if whole_cell else '–'
        row += [gain, gap]
    table.header += ['gain over random', 'gap to whole']
    table.notes.append('gain over random (DD-Ranking\'s improvement over random): ours − random real images of the '
                       'same ipc trained with the same evaluation protocol (augmentation, epochs); gap to whole: '
                       'whole training set − ours; points, for learned sets where those runs exist, else –.')
    return table


# ---------------------------------------------------------------------------------------------
# Every table by name, and the command lines of its missing cells
# ---------------------------------------------------------------------------------------------

def build_any(name, records, pool):
    """The tables of tables.py, the DSA paper's Tables 2-5, and the runs table with the ranking columns."""
    builders = {'table2': build_table2, 'table3': build_table3, 'table4': build_table4, 'table5': build_table5}
    if name in builders:
        return builders[name](records, pool)
    built = build_tables(name, records, pool)
    if name == 'runs':
        built = [add_ranking_columns(t, records, pool) for t in built]
    return built


def in_folder(command, folder, *sub):
    """A command writing into folder/sub...: Table 4/5 cells share one result-file name, so each gets a folder."""
    return f'{command} --save_path {shlex.quote(os.path.join(folder, *sub))}'


def table2_commands(dataset, records, folder):
    if dataset != TABLE2_DATASET:
        raise ReportError(f'table2 is the DSA paper\'s CIFAR100 table; use --dataset {TABLE2_DATASET} '
                          f'(or --commands table1 --dataset {dataset})')
    done = set(group_by(records, table1_key))
    commands = []
    for ipc in TABLE2_IPCS:
        for method in TABLE2_METHODS:
            if method == 'LD' or (method == 'whole' and ipc != TABLE2_IPCS[0]):
                continue
            if (dataset, None if method == 'whole' else ipc, method) not in done:
                commands.append(with_save_path(table1_command(method, dataset, ipc), folder))
    return commands


def table3_commands(dataset, records, folder):
    """DSA at ipc 1 learned with every network of pool M and evaluated on all of them (eval_mode M)."""
    done = set(group_by(records, table3_key))
    return [with_save_path(f'python main.py --dataset {dataset} --model {model} --ipc 1 --init real --method DSA '
                           f'--dsa_strategy {dsa_strategy_for(dataset)} --eval_mode M', folder)
            for model in TABLE3_MODELS if (dataset, 1, model) not in done]


def table4_cell_command(dataset, ipc, row, strategy, folder, extra=''):
    condense, dsa_eval = TABLE4_ROWS[row][1:]
    return in_folder(f'{TABLE45_COMMAND.format(dataset=dataset, ipc=ipc)} --dsa_strategy {strategy} '
                     f'--dsa_condense {condense} --dsa_eval {dsa_eval}{extra}', folder, 'table4',
                     f'{row.strip("()")}_{strategy}')


def table4_commands(dataset, records, folder):
    """The paper's ipc 10, 5 experiments x 5 networks per cell; row (A) once (it does not depend on the op)."""
    ipc = TABLE4_SETTING[1]
    done = set(group_by(records, table4_key))
    commands = []
    for row in TABLE4_ROWS:
        for strategy in TABLE4_STRATEGIES:
            key = (dataset, ipc, row, None if row == '(A)' else strategy)
            if key not in done:
                done.add(key)
                commands.append(table4_cell_command(dataset, ipc, row, strategy, folder, PAPER_REPEATS))
    return commands


def table5_commands(dataset, records, folder):
    done = {(r.dataset, r.ipc, table5_column(r)) for r in records}
    commands = []
    for column in TABLE5_COLUMNS:
        if (dataset, TABLE5_IPC, column) in done or (column == 'flip' and dataset in NO_FLIP_DATASETS):
            continue
        base = TABLE45_COMMAND.format(dataset=dataset, ipc=TABLE5_IPC)
        if column == 'none':
            command = f'{base} --dsa_strategy crop --dsa_condense none --dsa_eval 0'
        else:
            command = f'{base} --dsa_strategy {dsa_strategy_for(dataset) if column == "combination" else column}'
        commands.append(in_folder(command + PAPER_REPEATS, folder, 'table5', column))
    return commands


def commands_any(name, dataset, records, folder):
    """Command lines (with --save_path under folder) of the cells of table `name` without a result."""
    builders = {'table2': table2_commands, 'table3': table3_commands, 'table4': table4_commands,
                'table5': table5_commands}
    if name in builders:
        return builders[name](dataset, records, folder)
    return [with_save_path(c, folder) for c in missing_commands(name, dataset, records, [folder])]

