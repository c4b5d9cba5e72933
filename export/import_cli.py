"""`carousel import`: a stateful ONNX graph from anywhere into the model repository, verified.

A graph carousel cannot serve, or flags that do not fit it, are the user's to fix: the
reason goes to stderr on one line and the exit status is 2 (a usage error, as argparse's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Import a stateful ONNX graph (an LSTM, a GRU, any model that returns its next state):
check it with onnxruntime and write NAME/VERSION/{model.onnx, manifest.json} into the
model repository.

State pairs are detected when only one reading fits: an input and an output of the same
dtype and shape, told apart by names such as h0/hn, state/stateN, x_in/x_out. The batch
axis is the named dynamic dimension every state and per-step input has; the time axis a
second one the per-step inputs share. Inputs without the batch axis are constants and need
--constant. Before writing, the graph must compute for a batch of 3 what each row computes
alone, and (with a time axis) for 6 steps in one call what 3 + 3 steps compute with the
state carried, within 1e-5."""

EPILOG = """\
examples:
  carousel import forecaster.onnx --name forecaster
  carousel import gru.onnx --name gru --state state:1=stateN
  carousel import cell.onnx --name cell --state memory=memory_next --constant gain=0.5
  carousel import cell.onnx --name cell --constant 'bias=[0.1, 0.2]:overridable'

exit status: 0 written, 2 refused (the reason is printed; nothing is written)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from carousel.paths import bundled_model_repository

    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("graph", type=Path, help="the .onnx file to import")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--version", type=int, default=None,
                        help="integer version to write (default: the next free one)")
    parser.add_argument("--repository", type=Path, default=bundled_model_repository(),
                        help="model repository folder (default: %(default)s)")
    parser.add_argument("--state", action="append", default=[], metavar="IN[:AXIS]=OUT",
                        help="a state pair: input IN is fed what output OUT returned; AXIS is "
                             "its batch axis when the graph's dimension names do not say. "
                             "Repeat for each pair; when given, no pair is detected")
    parser.add_argument("--constant", action="append", default=[],
                        metavar="NAME=VALUE[:overridable]",
                        help="the value of an input without a batch axis: a number, true/false "
                             "or a JSON array of its shape; ':overridable' lets a request send "
                             "its own value. Repeat for each constant")
    parser.add_argument("--lengths", default=None, metavar="NAME",
                        help="the int input of shape [batch] that takes each row's real "
                             "number of steps (found by itself when named lengths, seq_lens "
                             "or sequence_lens)")
    parser.add_argument("--batch-dim", default=None, metavar="NAME",
                        help="the dimension name of the batch axis, when detection cannot tell")
    parser.add_argument("--time-dim", default=None, metavar="NAME",
                        help="the dimension name of the time axis, when the per-step inputs "
                             "share several")
    parser.add_argument("--description", default=None,
                        help="the manifest's description (default: 'imported from GRAPH')")
    parser.add_argument("--force", action="store_true",
                        help="overwrite the version if it exists")


def run(args: argparse.Namespace) -> int:
    from .errors import ExportError
    from .importer import import_graph
    from .manifest import read_manifest

    try:
        folder = import_graph(
            args.graph, args.repository, args.name, version=args.version, states=args.state,
            constants=args.constant, lengths=args.lengths, batch_dim=args.batch_dim,
            time_dim=args.time_dim, description=args.description, force=args.force,
        )
    except ExportError as e:
        print(f"carousel import: error: {e}", file=sys.stderr)
        return 2
    manifest = read_manifest(folder / "manifest.json")
    print(f"wrote {folder} ({manifest['graph']['bytes']:,} bytes, sha256 "
          f"{manifest['graph']['sha256'][:12]})")
    for s in manifest["state"]:
        print(f"state: {s['input']} -> {s['output']} {s['shape']} (batch axis {s['batch_axis']})")
    for c in manifest["constants"]:
        print(f"constant: {c['name']} = {c['value']}"
              + (" (overridable)" if c["overridable"] else ""))
    sequence = manifest["sequence"]
    if sequence:
        lengths = (f"lengths input {sequence['lengths']!r}" if sequence["lengths"]
                   else "no lengths input")
        print(f"time axis: {sequence['axis']!r} ({lengths})")
    else:
        print("time axis: none (one step per call)")
    for check in manifest["verification"]["checks"]:
        worst = max(check["max_abs_diff"].values(), default=0.0)
        print(f"verified {check['check']}: max abs diff {worst:.2e} "
              f"(tolerance {manifest['verification']['tolerance']:g})")
    return 0
