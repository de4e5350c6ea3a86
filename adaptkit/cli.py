"""The ``adaptkit`` command: check a training setup, or estimate its memory, before loading any weights.

``check``, ``estimate``, ``recommend`` and ``env`` (docs/check-and-estimate.md, docs/recommend.md, docs/versions.md).
``check`` exits 1 when it finds a problem; a mistyped flag or a bad flag value exits 2 with a message naming the
flag, the value and the fix. ``--json`` prints machine-readable output instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
from typing import Any

from adaptkit.check import check
from adaptkit.errors import AdaptkitError, ConfigError
from adaptkit.estimate import DEFAULT_STRATEGIES, estimate
from adaptkit.names import TASKS
from adaptkit.recommend import recommend
from adaptkit.skeleton import DTYPES
from adaptkit.versions import report as versions_report

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises a typed error (flag, value, fix; "did you mean") instead of printing usage."""

    def error(self, message: str):
        # unknown flags never reach here: main parses with parse_known_args and _refuse_extra says them
        argument = re.match(r"argument (\S+?)(?:/\S+)?: (.*)", message, re.DOTALL)
        if argument:
            flag, problem = argument.groups()
            choice = re.match(r"invalid choice: '([^']*)' \(choose from (.*)\)", problem)
            if choice:
                value, options = choice.groups()
                names = [o.strip(" '") for o in options.split(",")]
                close = difflib.get_close_matches(value, names, n=1)
                raise ConfigError(field=flag, value=value, problem="is not one of the choices",
                                  fix=(f"did you mean {close[0]!r}? " if close else "") + f"choose from {options}")
            bad_value = re.match(r"'(.*)' (is .*)", problem)
            if bad_value:
                raise ConfigError(field=flag, value=bad_value.group(1), problem=bad_value.group(2),
                                  fix=f"run '{self.prog} --help'")
            raise ConfigError(field=flag, problem=problem, fix=f"run '{self.prog} --help'")
        missing = re.match(r"the following arguments are required: (.*)", message)
        if missing:
            raise ConfigError(field=missing.group(1), problem="is required", fix=f"run '{self.prog} --help'")
        raise ConfigError(field=self.prog, problem=message, fix=f"run '{self.prog} --help'")


def parse_options(items: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` flags (also the recipes'): VALUE as JSON when it parses (16, 0.1, true, ["a"]), a
    comma list gives a list of names (targets=query,value), anything else stays a string."""
    options: dict[str, Any] = {}
    for text in items:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(field="--option", value=text, problem="is not KEY=VALUE", fix="write e.g. --option r=16")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = [v.strip() for v in raw.split(",") if v.strip()] if "," in raw else raw
    return options


def _positive_int(flag: str):
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (e.g. {flag} 2)")
        return int(text)
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="adaptkit", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="model folder, hub id (read from the local cache) or config.json")
        p.add_argument("--task", default="auto", choices=["auto", *TASKS],
                       help="model head to build (default: from the config; a bare encoder -> seq_cls)")
        p.add_argument("--num-labels", type=_positive_int("--num-labels"), default=None)
        p.add_argument("--quantization", default="none", help="none, 8bit or 4bit (bitsandbytes)")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")

    check = commands.add_parser("check", help="validate model x strategy x options x quantization x processes")
    common(check)
    check.add_argument("--strategy", default="lora", help="lora, bottleneck, prefix, linear_probe, full or a PEFT "
                                                          "method name (default: lora)")
    check.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                       help="a strategy option, repeatable: -o r=16 -o targets=query,value")
    check.add_argument("--processes", type=_positive_int("--processes"), default=1)
    check.add_argument("--gradient-checkpointing", action="store_true")
    check.add_argument("--max-length", type=_positive_int("--max-length"), default=None,
                       help="tokens per example, checked against the model's positions (virtual tokens included)")

    est = commands.add_parser("estimate", help="peak training memory and step cost of every strategy")
    common(est)
    est.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                     help=f"comma-separated (default: {','.join(DEFAULT_STRATEGIES)})")
    est.add_argument("--batch-size", type=_positive_int("--batch-size"), default=32)
    est.add_argument("--seq-len", type=_positive_int("--seq-len"), default=128)
    est.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    est.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                     help="where training will run (decides which attention kernel is assumed)")
    rec = commands.add_parser("recommend", help="which strategy to run: every candidate ranked for data and memory")
    rec.add_argument("model", help="model folder, hub id (read from the local cache) or config.json: no weights read")
    rec.add_argument("--task", required=True, help=f"task type: one of {', '.join(sorted(TASKS))}")
    rec.add_argument("--examples", type=_positive_int("--examples"), required=True, help="training examples you have")
    rec.add_argument("--memory", required=True, help="memory to train in, e.g. 8GB (RAM on cpu, GPU memory on cuda)")
    rec.add_argument("--time", default=None, help="time for --epochs epochs, e.g. 2h (cpu only)")
    rec.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    rec.add_argument("--epochs", type=_positive_int("--epochs"), default=3)
    rec.add_argument("--seq-len", type=_positive_int("--seq-len"), default=128, help="longest example, tokens")
    rec.add_argument("--mean-len", type=_positive_int("--mean-len"), default=None, help="typical example (time)")
    rec.add_argument("--num-labels", type=_positive_int("--num-labels"), default=2)
    rec.add_argument("--json", action="store_true", help="print JSON instead of text")
    env = commands.add_parser("env", help="library versions and device, each against the tested set (for bug reports)")
    parser.commands = {"check": check, "estimate": est, "recommend": rec, "env": env}
    return parser


def _refuse_extra(parser: _Parser, command: str, extra: list[str]) -> None:
    """argparse reports a subcommand's unknown flags at the top, against the top's flags; say them against
    the subcommand's own (``estimate --strategy`` -> did you mean --strategies), and name another
    subcommand that takes the flag as written."""
    if not extra:
        return
    sub, flag = parser.commands[command], extra[0]
    if not flag.startswith("-"):  # most often a strategy typed as a second positional
        example = {"check": f"--strategy {flag}", "estimate": f"--strategies {flag}"}.get(command)
        raise ConfigError(field="argument", value=flag, problem=f"is one argument too many for '{sub.prog}'", fix=(
            f"give it as a flag's value, e.g. {example}; " if example else "") + f"run '{sub.prog} --help'")
    own = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(flag.split("=")[0], own, n=1)
    elsewhere = [name for name, p in parser.commands.items() if name != command
                 and any(flag.split("=")[0] in a.option_strings for a in p._actions)]
    hint = (f"did you mean {close[0]}? " if close else "") + \
        (f"{flag.split('=')[0]} is a flag of 'adaptkit {elsewhere[0]}'; " if elsewhere else "")
    raise ConfigError(field="flag", value=flag, problem=f"is not a flag of '{sub.prog}'",
                      fix=f"{hint}run '{sub.prog} --help'")


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        _refuse_extra(parser, args.command, extra)
        if args.command == "env":
            print(versions_report())
            return EXIT_OK
        if args.command == "recommend":
            rec = recommend(args.model, task=args.task, train_examples=args.examples, memory=args.memory,
                            time=args.time, device=args.device, seq_len=args.seq_len, mean_len=args.mean_len,
                            num_labels=args.num_labels, epochs=args.epochs)
            print(json.dumps(rec.to_dict(), indent=2) if args.json else rec)
            return EXIT_OK
        return _check(args) if args.command == "check" else _estimate(args)
    except AdaptkitError as exc:  # a bad flag or value, or a model that cannot be read
        print(f"adaptkit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `adaptkit recommend ... | head`: the reader left; as for any Unix filter, not an error
        sys.stdout = open(os.devnull, "w")  # Python would otherwise fail flushing stdout at exit
        return EXIT_OK


def _check(args) -> int:
    report = check(args.model, args.strategy, options=parse_options(args.option), task=args.task,
                   num_labels=args.num_labels, quantization=args.quantization, processes=args.processes,
                   gradient_checkpointing=args.gradient_checkpointing, max_length=args.max_length,
                   raise_on_error=False)
    if args.json:
        print(json.dumps({"ok": report.ok, "model": report.model, "model_class": report.model_class,
                          "task": report.task, "strategy": report.strategy.to_dict() if report.strategy else None,
                          "trainable": report.trainable, "total": report.total, "notes": report.notes,
                          "problems": [{"error": type(p).__name__, "field": p.field, "value": repr(p.value),
                                        "problem": p.problem, "fix": p.fix, "message": str(p)}
                                       for p in report.problems]}, indent=2))
    else:
        print(report)
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _estimate(args) -> int:
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not names:
        raise ConfigError(field="--strategies", value=args.strategies, problem="names no strategy",
                          fix="pass e.g. --strategies full,lora")
    result = estimate(args.model, names, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
                      quantization=args.quantization, task=args.task, num_labels=args.num_labels, device=args.device)
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else result)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
