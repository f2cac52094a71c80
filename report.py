"""From the JSON summaries our runs write to the papers' tables, the missing command lines, and plots.

    python report.py result/ [more folders]              # every table with results, in markdown
    python report.py result/ --latex --table table1      # one table, as LaTeX
    python report.py result/ --pool                      # pool several runs of one cell (default: the newest)
    python report.py result/ --commands table1 --dataset CIFAR10   # command lines of the cells without a finished result
    python report.py result/ --plots plots/              # accuracy/loss vs iteration, accuracy vs ipc (PNG)
    python report.py result/ --table table4              # the DSA paper's Tables 2-5: table2 ... table5
    python report.py --fig5 dsa/res_X.json dc/res_Y.json --out figs/     # gradient norms (--grad_stats runs)
    python report.py --fig6 noise/snap_X_exp0.pt real/snap_X_exp0.pt --fig6_classes 0 1 --out figs/
    python report.py --embed result/res_X.pt --dataset FashionMNIST --out figs/   # PCA / LDA of a set

Read (recursively): res_*.json of main.py / main_DM.py (learned sets and coreset baselines), eval_*.json of
--load_syn evaluations and cl_*.json of CL_DM.py. Any other JSON file is skipped with a one-line warning.
Only the standard library is needed for tables; matplotlib only for --plots.
"""
import argparse
import sys

from base import UserError, check_writable_folder
from dsa_figures import add_figure_args, draw_figures
from dsa_tables import ALL_TABLE_NAMES as TABLE_NAMES, build_any, commands_any
from noisetables import build_noise_tables, load_entries
from plots import write_plots
from tables import DATASETS, ReportError, load_records, render_latex, render_markdown

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folders', nargs='*', default=['result'],
                        help='folders scanned recursively for result JSON files (default: result)')
    parser.add_argument('--latex', action='store_true', help='LaTeX tabulars instead of markdown')
    parser.add_argument('--pool', action='store_true',
                        help='pool several runs of one cell (default: the newest file, by modification time)')
    parser.add_argument('--table', type=str, default=None, help=f"print one table: {', '.join(TABLE_NAMES)}, noise")
    parser.add_argument('--commands', type=str, default=None, metavar='TABLE',
                        help='print the command lines, at the papers\' settings, of the cells of TABLE without a '
                             'result (needs --dataset)')
    parser.add_argument('--dataset', type=str, default=None, help='dataset of --commands')
    parser.add_argument('--plots', type=str, default=None, metavar='DIR',
                        help='also write PNG plots into DIR: accuracy and loss vs iteration per run, accuracy vs ipc')
    add_figure_args(parser)  # --fig5, --fig6, --embed (dsa_figures.py)
    return parser.parse_args(argv)


REPORT_TABLES = TABLE_NAMES + ('noise',)  # noise: noisetables.py (pure rate and accuracy of noisy-label runs)


def check_table_name(name):
    if name not in REPORT_TABLES:
        raise ReportError(f"unknown table '{name}'; valid tables: {', '.join(REPORT_TABLES)}")


def print_commands(args):
    check_table_name(args.commands)
    if args.dataset is None:
        raise ReportError(f'--commands {args.commands} needs --dataset (one of {", ".join(DATASETS)})')
    if args.dataset not in DATASETS:
        raise ReportError(f"unknown dataset '{args.dataset}'; valid datasets: {', '.join(DATASETS)}")
    records = load_records(args.folders, missing_ok=True)
    commands = commands_any(args.commands, args.dataset, records, args.folders[0])
    print(f'# {args.commands} on {args.dataset}: {len(commands)} cell(s) without a finished result in '
          f'{", ".join(args.folders)}')
    for command in commands:
        print(command)


def print_tables(args, records):
    names = [args.table] if args.table else REPORT_TABLES
    render = render_latex if args.latex else render_markdown
    printed = 0
    for name in names:
        tables = build_noise_tables(load_entries(args.folders)) if name == 'noise' else build_any(name, records,
                                                                                                    args.pool)
        for table in tables:
            print(render(table))
            printed += 1
    if args.table and not printed:
        print(f'no results for table {args.table} in {", ".join(args.folders)}; '
              f'python report.py {" ".join(args.folders)} --commands {args.table} --dataset D lists the runs it needs')


def main(argv=None):
    args = parse_args(argv)
    if draw_figures(args):
        return None
    if args.commands:
        return print_commands(args)
    if args.table:
        check_table_name(args.table)
    if args.plots:
        try:  # before the folders are read: a typo in DIR fails first, in one line
            check_writable_folder(args.plots, '--plots')
        except UserError as e:
            raise ReportError(str(e)) from e
    records = load_records(args.folders)
    if not records:
        raise ReportError(f'no result files (res_*.json, eval_*.json, cl_*.json) in {", ".join(args.folders)}')
    print_tables(args, records)
    if args.plots:
        written = write_plots(records, args.plots, args.pool)
        print(f'{len(written)} plot(s) written to {args.plots}' + ''.join(f'\n  {p}' for p in written))


def cli(argv=None):
    """Bad input ends in one 'error: ...' line and exit status 2, never a traceback."""
    try:
        main(argv)
    except ReportError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a report must never end in a traceback; the one line names what went wrong
        print(f'error: {type(e).__name__}: {" ".join(str(e).split())}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    cli()
