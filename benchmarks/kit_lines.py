"""Lines of adaptkit/recipes/ by what they are for: each top-level definition in one category (a new one must be
placed, or this fails), the rest (module docstrings, imports, constants, blank lines) counted apart.

    python benchmarks/kit_lines.py      # a markdown table; issue 27 set the kit at <= 1,300 lines
"""

import ast
import collections
import pathlib

KIT = pathlib.Path(__file__).resolve().parents[1] / "adaptkit" / "recipes"
# module -> the top-level definitions that serve each purpose ("*": all of them)
PURPOSES = {
    "typed data errors (item 5)": {
        "data": ["from_dataset", "check_options", "_pick_text_columns", "_type_labels", "_classes", "read_file",
                 "quiet", "_read_error", "read_table", "_first"],
        "sources": ["load_raw", "_split_files", "labelled", "check_images"],
        "batching": ["lm_rows", "_turns", "check_vocab"],
        "guards": ["require_examples", "require_classes", "check_numbers"]},
    "bit-exact resume + flag/data guard (item 5)": {"checkpoints": "*", "runs": ["Progress"]},
    "NaN and over-long-input guards (item 5)": {
        "guards": ["check_finite_loss", "check_finite_weights", "fit_max_length", "prompt_room"],
        "batching": ["encode_split"]},
    "typed run arguments, folder claim (item 5)": {
        "training": ["_flag", "RunArgs", "check_output_dir", "run_parser", "preprocessor_name", "trackers"],
        "runs": ["claim_output_dir", "lock_folder", "_write_pid"]},
    "LM rows -> tokens (5 formats, chat templates, packing)": {
        "batching": ["lm_format", "encode", "_encode", "pack", "prompt_ids", "_chat_ids"]},
    "metrics (GLUE conventions, sklearn/scipy)": {
        "metrics": "*", "training": ["evaluate_classifier", "evaluate_perplexity"]},
    "collapsed-output warnings": {"guards": ["output_spread", "constant_output", "collapse_warning"]},
    "log, metrics.json, card": {
        "runs": ["Log", "finish", "peak_rss_bytes", "save_adapter", "keep_adapter"], "training": ["JsonLines"]},
    "splits, batches, accelerator/optimizer/schedule, base": {
        "data": ["Table"], "sources": ["Splits", "arrange", "load_splits", "add_data_args", "splits_from_args"],
        "batching": ["tokenize", "make_collator", "LengthGroupedSampler", "make_dataloader", "causal_lm_loader"],
        "training": ["load_base", "learning_rate", "make_accelerator", "make_optimizer", "plan_steps",
                     "make_scheduler"]},
}
OTHER = "module docstrings, imports, constants, blank lines between"


def main() -> None:
    lines = collections.Counter()
    for f in sorted(KIT.glob("*.py")):
        module, source = f.stem, f.read_text()
        for node in ast.parse(source).body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            purpose = next((c for c, names in PURPOSES.items()
                            if names.get(module) == "*" or node.name in names.get(module, [])), None)
            if purpose is None:
                raise SystemExit(f"{f.name}: {node.name} is in no purpose: place it in PURPOSES")
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines[purpose] += node.end_lineno - start + 1
        lines[OTHER] += len(source.splitlines())
    lines[OTHER] -= sum(n for purpose, n in lines.items() if purpose != OTHER)
    print("| what it is for | lines |\n|---|---:|")
    for purpose, n in lines.most_common():
        print(f"| {purpose} | {n} |")
    print(f"| total | {sum(lines.values())} |")


if __name__ == "__main__":
    main()
