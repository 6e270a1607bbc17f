"""The ``reattend`` command: run a recipe or one of its stages, inspect plans and runs, move models."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .pipeline import STAGES
from .recipe import RecipeError, load_recipe

VERBS_WITH_RECIPE = ("run", "convert", "transfer", "recover", "export", "validate", "plan")


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields, e.g. transfer.tokens=1e5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reattend", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    _recipe_args(verbs.add_parser("run", help="run every stage: convert, transfer, recover, eval, export (+ push)"))
    for name in ("convert", "transfer", "recover", "export"):
        _recipe_args(verbs.add_parser(name, help=f"run the {name} stage (and any missing stage before it)"))
    _recipe_args(verbs.add_parser("validate", help="check a recipe without loading weights"))
    _recipe_args(verbs.add_parser("plan", help="per layer: target, options, parameters, KV-cache bytes per token"))
    ev = verbs.add_parser("eval", help="compare student and teacher: a recipe's eval stage, or --student/--teacher")
    ev.add_argument("recipe", nargs="?", help="recipe whose eval stage to run")
    ev.add_argument("overrides", nargs="*", metavar="key=value")
    ev.add_argument("--student", help="exported student folder")
    ev.add_argument("--teacher", help="teacher hub id, folder or embedded:NAME")
    ev.add_argument("--out", default="reattend-eval", help="report folder for --student/--teacher (default %(default)s)")
    push = verbs.add_parser("push", help="upload an exported folder to the Hugging Face Hub")
    push.add_argument("folder")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--public", action="store_true", help="create the repo public (default private)")
    ls = verbs.add_parser("ls", help="list a run's stages, their state and headline metrics")
    ls.add_argument("output_dir")
    cp = verbs.add_parser("cp", help="copy an exported model folder (or a run's export) to a folder or hf://REPO_ID")
    cp.add_argument("source", help="exported folder, or a run's output_dir")
    cp.add_argument("destination", help="folder, or hf://owner/name to push")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (RecipeError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.verb in VERBS_WITH_RECIPE or (args.verb == "eval" and args.recipe):
        from .image.recipe import read_kind

        if read_kind(args.recipe) == "image":
            from .image.run import dispatch

            return dispatch(args.verb, args.recipe, args.overrides)
        recipe = load_recipe(args.recipe, args.overrides)
        if args.verb == "validate":
            from .planning import validate

            print(validate(recipe))
            return 0
        if args.verb == "plan":
            from .planning import plan_table

            print(plan_table(recipe))
            return 0
        from .runner import Run

        run = Run(recipe)
        if args.verb == "run":
            run.run()
        else:
            stages = STAGES[: STAGES.index(args.verb) + 1]
            run.run(tuple(s for s in stages if s == args.verb or not run.stage(s).done))
        return 0
    if args.verb == "eval":
        if not (args.student and args.teacher):
            raise ValueError("eval: give a recipe, or both --student DIR and --teacher ID_OR_DIR")
        from .evaluate import evaluate_folders
        from .evaluate.config import EvalConfig
        from .recipe import apply_overrides

        cfg = EvalConfig(**apply_overrides({}, args.overrides))
        evaluate_folders(args.student, args.teacher, cfg, args.out)
        return 0
    if args.verb == "push":
        from .export.push import push_folder

        print(push_folder(args.folder, args.repo_id, private=not args.public))
        return 0
    if args.verb == "ls":
        print(list_run(args.output_dir))
        return 0
    if args.verb == "cp":
        copy_model(args.source, args.destination)
        return 0
    raise AssertionError(args.verb)


def list_run(output_dir: str) -> str:
    root = Path(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"ls: {output_dir!r} is not a folder; pass a recipe's output_dir")
    lines = [f"{root}:"]
    for name in STAGES:
        path = root / name
        if (path / "done.json").exists():
            result = json.loads((path / "done.json").read_text())
            detail = ", ".join(f"{k}={v}" for k, v in result.items() if k in ("perplexity", "tokens", "wall_time_s", "dir"))
            lines.append(f"  {name:9s} done     {detail}")
        elif (path / "checkpoint" / "state.json").exists():
            step = json.loads((path / "checkpoint" / "state.json").read_text())["step"]
            lines.append(f"  {name:9s} partial  (checkpoint at step {step}; re-run to resume)")
        elif path.exists():
            lines.append(f"  {name:9s} started")
        else:
            lines.append(f"  {name:9s} -")
    return "\n".join(lines)


def _exported_folder(source: str) -> Path:
    path = Path(source)
    if (path / "config.json").exists():
        return path
    done = path / "export" / "done.json"
    if done.exists():
        return Path(json.loads(done.read_text())["dir"])
    raise FileNotFoundError(f"cp: {source!r} is neither an exported model folder nor a run with a finished export stage")


def copy_model(source: str, destination: str) -> None:
    folder = _exported_folder(source)
    if destination.startswith("hf://"):
        from .export.push import push_folder

        print(push_folder(folder, destination[len("hf://"):]))
        return
    dest = Path(destination)
    if dest.exists():
        raise FileExistsError(f"cp: destination {destination!r} exists; remove it or choose another")
    shutil.copytree(folder, dest)
    print(f"copied {folder} -> {dest}")


if __name__ == "__main__":
    sys.exit(main())
