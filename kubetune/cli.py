"""The `kubetune` command. Subcommands import the trainer or operator only when they need them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kubetune.spec import FineTuneJob
from kubetune.validate import (
    SpecError,
    apply_profile,
    load_job,
    load_jobs,
    load_profile,
    local_path_warnings,
    profile_warnings,
)


def _local_data_problems(job: FineTuneJob) -> list[str]:
    """Bad rows in the job's data when it is on this machine (needs the trainer extra; else skipped)."""
    from pathlib import Path

    from kubetune.uris import parse_uri

    sources = [job.spec.dataset.uri, *(m.uri for m in job.spec.dataset.mix)]
    local = [parse_uri(u) for u in sources]
    if not any(u.scheme == "file" and Path(u.path).exists() for u in local):
        return []  # remote (s3://, pvc://, a path inside the image): checked when the trainer reads it
    try:
        from kubetune_trainer.formats import check_dataset
    except ImportError:
        return []
    return check_dataset(job.spec)


def _validate(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile) if args.profile else None
    bad = 0
    for path in args.files:
        try:
            jobs = load_jobs(path, args.set)
            if profile is not None:
                jobs = [apply_profile(job, profile, path) for job in jobs]
        except SpecError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            bad += 1
            continue
        for job in jobs:
            for field, warning in [] if profile is not None else profile_warnings(job):
                print(f"{path} ({job.metadata.name}): {field}: warning: {warning}", file=sys.stderr)
            for field, warning in local_path_warnings(job):
                print(f"{path} ({job.metadata.name}): {field}: warning: {warning}", file=sys.stderr)
            data_problems = [] if args.no_data else _local_data_problems(job)
            for problem in data_problems:
                print(f"{path} ({job.metadata.name}): spec.dataset: {problem}", file=sys.stderr)
            bad += bool(data_problems)
            if not args.quiet and not data_problems:
                print(
                    f"{path}: {job.metadata.name}: valid ({job.spec.method}, {job.spec.pet_config.pet_type})"
                )
    return 1 if bad else 0


def _crd(args: argparse.Namespace) -> int:
    from kubetune.crd import render_crd_yaml

    sys.stdout.write(render_crd_yaml(args.kind))
    return 0


def _policy(args: argparse.Namespace) -> int:
    from kubetune.policy import render_policy_yaml

    sys.stdout.write(render_policy_yaml(helm=args.helm))
    return 0


def _render(args: argparse.Namespace) -> int:
    from kubetune_operator.render import render_job, to_yaml

    profile = load_profile(args.profile) if args.profile else None
    docs = []
    for path in args.files:
        for job in load_jobs(path, args.set):
            job = apply_profile(job, profile, path)  # without one: the job as written (model.uri needed)
            if args.namespace:
                job.metadata.namespace = args.namespace
            docs += render_job(job, attempt=args.attempt)
    sys.stdout.write(to_yaml(docs))
    return 0


def _run(args: argparse.Namespace) -> int:
    from kubetune_trainer.launch import run_local

    return run_local(
        args.file,
        nproc_per_node=args.nproc_per_node,
        output=args.output,
        max_steps=args.max_steps,
        cpu=args.cpu,
        restart=args.restart,
        profile=args.profile,
        overrides=args.set,
    )


def _inspect_data(args: argparse.Namespace) -> int:
    from kubetune_trainer.inspect_data import inspect_data

    inspect_data(load_job(args.file), samples=args.samples)
    return 0


def _status(args: argparse.Namespace) -> int:
    from kubetune_trainer.progress import print_status

    return print_status(load_job(args.file))


def _plan(args: argparse.Namespace) -> int:
    import json

    job = load_job(args.file, args.set)
    if args.profile:
        job = apply_profile(job, load_profile(args.profile), args.file)
    try:
        from kubetune_trainer.plan import plan_job
    except ImportError as e:
        print(f"kubetune plan needs kubetune[trainer] installed: {e}", file=sys.stderr)
        return 1
    from kubetune.plan import render

    plan = plan_job(job, gpu_memory=args.gpu_memory, tflops=args.tflops)
    print(json.dumps(plan, indent=1) if args.json else render(plan))
    return 1 if plan["fits"] is False else 0


def _eval(args: argparse.Namespace) -> int:
    try:
        from kubetune_trainer.evaluation import run_eval
    except ImportError as e:
        print(f"kubetune eval needs kubetune[trainer] installed: {e}", file=sys.stderr)
        return 1
    job = load_job(args.file)
    if args.output:
        job.spec.output.uri = args.output
    return run_eval(job)


def _chat(args: argparse.Namespace) -> int:
    from kubetune_trainer.chat import run_chat

    return run_chat(
        args.output,
        prompt=args.prompt,
        system=args.system,
        base=args.base,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )


def _export(args: argparse.Namespace) -> int:
    from kubetune_trainer.convert import export

    written = export(
        args.source,
        args.dest,
        base=args.base,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        adapter_only=args.adapter,
    )
    print(f"kubetune export: wrote {written}", file=sys.stderr)
    return 0


def _examples(args: argparse.Namespace) -> int:
    from kubetune.catalog import find_examples, get_example

    if args.name:
        try:
            example = get_example(args.name)
        except KeyError as e:
            print(f"kubetune examples: {e.args[0]}", file=sys.stderr)
            return 1
        sys.stdout.write(example.path.read_text(encoding="utf-8"))
        return 0
    found = find_examples(args.pattern)
    if not found:
        print(f"kubetune examples: none matches {args.pattern!r}", file=sys.stderr)
        return 1
    width = max(len(e.name) for e in found)
    for e in found:
        print(f"{e.name:<{width}}  {e.description}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kubetune")
    except PackageNotFoundError:  # a source tree without an install
        return "unknown"


JOB_FILE_HELP = "a FineTuneJob YAML file"
SET_HELP = (
    "set one field of the job, e.g. training.learning_rate=1e-4 (a path under spec; the value is YAML); "
    "repeatable, validated like the file"
)
PROFILE_HELP = "a FineTuneProfile YAML file: apply its defaults, pod settings, model catalog and limits"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="Fine-tune LLMs on Kubernetes.")
    parser.add_argument("--version", action="version", version=f"kubetune {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="check FineTuneJob YAML files")
    p.add_argument(
        "files", nargs="+", metavar="FILE", help="FineTuneJob YAML files (several jobs per file allowed)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    p.add_argument("--no-data", action="store_true", help="do not read local dataset files")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help=SET_HELP)
    p.add_argument("--profile", metavar="PROFILE", help=PROFILE_HELP)
    p.set_defaults(func=_validate)

    p = sub.add_parser("crd", help="print the FineTuneJob (or FineTuneProfile) CustomResourceDefinition")
    p.add_argument(
        "--kind",
        choices=["FineTuneJob", "FineTuneProfile"],
        default="FineTuneJob",
        help="default FineTuneJob",
    )
    p.set_defaults(func=_crd)

    p = sub.add_parser(
        "policy", help="print the ValidatingAdmissionPolicy (and binding) enforcing profile limits at apply"
    )
    p.add_argument("--helm", action="store_true", help="print the chart's template instead")
    p.set_defaults(func=_policy)

    p = sub.add_parser("render", help="print the Kubernetes objects the operator creates for a job")
    p.add_argument("files", nargs="+", metavar="FILE", help="FineTuneJob YAML files")
    p.add_argument("--attempt", type=int, default=1, help="the attempt number to render (default 1)")
    p.add_argument("-n", "--namespace", default=None, help="namespace of the objects (default the job's)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help=SET_HELP)
    p.add_argument("--profile", metavar="PROFILE", help=PROFILE_HELP)
    p.set_defaults(func=_render)

    p = sub.add_parser("run", help="run a FineTuneJob locally with torchrun (no cluster)")
    p.add_argument("file", metavar="FILE", help=JOB_FILE_HELP)
    p.add_argument("--nproc-per-node", type=int, default=None, help="default: the spec's, else GPUs or 1")
    p.add_argument("--output", default=None, help="override spec.output.uri")
    p.add_argument("--max-steps", type=int, default=None, help="override spec.training.max_steps")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where the spec requests GPUs")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help=SET_HELP)
    p.add_argument("--profile", metavar="PROFILE", help=PROFILE_HELP)
    p.add_argument(
        "--restart",
        action="store_true",
        help="train again from step 0 into the same output, superseding the run there (asks on a terminal)",
    )
    p.set_defaults(func=_run)

    p = sub.add_parser("inspect-data", help="show rendered training samples with the trained span marked")
    p.add_argument("file", metavar="FILE", help=JOB_FILE_HELP)
    # no -n: that is the namespace, as in kubectl and `kubetune render`
    p.add_argument("-s", "--samples", type=int, default=3, help="how many samples to show (default 3)")
    p.set_defaults(func=_inspect_data)

    p = sub.add_parser(
        "plan",
        help="estimate a job's memory per GPU (weights, adapter, gradients, optimizer, activations) and "
        "say whether it fits; exit 1 if it does not",
    )
    p.add_argument("file", metavar="FILE", help=JOB_FILE_HELP)
    p.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="memory per GPU, e.g. 80GiB (default: from resources.node_selector's GPU labels; "
        "a CPU job: resources.memory per process)",
    )
    p.add_argument(
        "--tflops", type=float, metavar="T", help="achieved TFLOP/s per GPU: also estimate the step time"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help=SET_HELP)
    p.add_argument("--profile", metavar="PROFILE", help=PROFILE_HELP)
    p.set_defaults(func=_plan)

    p = sub.add_parser("status", help="print a job's progress.json from its output store")
    p.add_argument("file", metavar="FILE", help=JOB_FILE_HELP)
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "chat", help="chat with a trained model (a job's output, final/merged, final/adapter or a checkpoint)"
    )
    p.add_argument(
        "output",
        metavar="OUTPUT",
        help="a job's output URI (path or s3://), a final/ directory or a checkpoint",
    )
    p.add_argument(
        "--prompt", metavar="TEXT", default=None, help="answer this one message on stdout and exit"
    )
    p.add_argument(
        "--system", metavar="TEXT", default=None, help="system prompt (default: the one the job trained with)"
    )
    p.add_argument(
        "--base", metavar="MODEL", default=None, help="base model of an adapter (default: the one it records)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument(
        "--temperature", type=float, default=None,
        help="sampling temperature; 0 is greedy (default 0 with --prompt, 0.7 in a chat)",
    )  # fmt: skip
    p.set_defaults(func=_chat)

    p = sub.add_parser(
        "export", help="write an adapter (merged onto its base) or a checkpoint as a Hugging Face model"
    )
    p.add_argument(
        "source", metavar="SOURCE",
        help="an adapter or checkpoint directory (checkpoint-N, step-N, FSDP too) or a job output (path or s3://)",
    )  # fmt: skip
    p.add_argument("dest", metavar="DEST", help="a new directory (or s3:// prefix) for the model")
    p.add_argument(
        "--base", metavar="MODEL", default=None, help="base model (default: the one the source records)"
    )
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
        help="weights' dtype (default auto: the job's training precision, else the model's own)",
    )  # fmt: skip
    p.add_argument(
        "--max-shard-size", metavar="SIZE", default=None, help="e.g. 2GB: split the weights into shards"
    )
    p.add_argument("--adapter", action="store_true", help="write a LoRA source's adapter alone, not merged")
    p.set_defaults(func=_export)

    p = sub.add_parser("examples", help="list the shipped example jobs, or print one to copy")
    p.add_argument("name", metavar="NAME", nargs="?", default=None, help="print this example (e.g. sft-lora)")
    p.add_argument("-p", "--pattern", default=None, help="only examples whose name or description matches")
    p.set_defaults(func=_examples)

    p = sub.add_parser(
        "eval",
        help="score a finished job's model against its base model (spec.evaluation); exit 1 if a threshold fails",
    )
    p.add_argument("file", metavar="FILE", help=JOB_FILE_HELP)
    p.add_argument("--output", default=None, help="override spec.output.uri")
    p.set_defaults(func=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # plain `kubetune`: what it can do, not an error
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except SpecError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    except Exception as e:
        if not _is_job_error(e):
            raise
        print(f"kubetune: {e}", file=sys.stderr)
        return 1


def _is_job_error(e: Exception) -> bool:
    """Problems the user fixes (a bad data row, an unreachable model) print as one line, not a traceback."""
    try:
        from kubetune_trainer.errors import JobError
    except ImportError:
        return False
    return isinstance(e, JobError)


if __name__ == "__main__":
    sys.exit(main())
