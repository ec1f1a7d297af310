"""The command line: run, plan, list, show, validate.

    python -m entrypoint run RECIPE [key=value ...]     # also: python -m entrypoint RECIPE ...
    python -m entrypoint plan RECIPE [--json] [--assume-gpus 4x80] [key=value ...]
    python -m entrypoint list
    python -m entrypoint show RECIPE [key=value ...]
    python -m entrypoint validate FILE|RECIPE [key=value ...]
    python -m entrypoint doctor [--json]
    python -m entrypoint doctor --collectives [--timeout SECONDS] [--json]
    python -m entrypoint export RUN_DIR|RECIPE --to adapter|merged_16bit|gguf[:QUANT,...] ... [--no-check]
    python -m entrypoint generate RUN_DIR|RECIPE [--prompt TEXT] [--image FILE] [--max-new-tokens N]

RECIPE is a bundled name or a path to a YAML file; the RECIPE variable serves when the
command line names none. Any bad input ends with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence

from entrypoint import collectives, datareport, doctor, environment, followup, gpus, host, launch
from entrypoint.plan import Plan, make
from recipes import catalog, exports
from recipes.errors import EXIT_BAD_INPUT, BadInput

COMMANDS = ("run", "plan", "list", "show", "validate", "doctor", "export", "generate")

ENV_HELP = environment.contract_help()


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: same contract, exit 2
        self.print_usage(sys.stderr)
        raise BadInput(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="entrypoint",
        description="Launch Unsloth fine-tuning recipes on one or several GPUs, chosen from the environment.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", parser_class=Parser)

    def recipe_command(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(
            name, help=help_text, epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        cmd.add_argument("recipe", nargs="?", help="bundled recipe name or path to a YAML file (default: $RECIPE)")
        cmd.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides")
        return cmd

    for name, help_text in (("run", "plan and launch a recipe"), ("plan", "print the launch plan; start nothing")):
        cmd = recipe_command(name, help_text)
        cmd.add_argument(
            "--assume-gpus", metavar="N[xGIB]", help="plan for N GPUs (of GIB each) instead of this host's"
        )
        if name == "plan":
            cmd.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    sub.add_parser("list", help="list the bundled recipes")
    doctor_cmd = sub.add_parser("doctor", help="GPUs, versions, shm and limits; warns about known stalls")
    doctor_cmd.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    doctor_cmd.add_argument(
        "--collectives",
        action="store_true",
        help="start the ranks as a ddp run would (NUM_GPUS, CPU_PROCESSES, NNODES...) and time all-reduce and "
        "all-gather between them; exit 1 when they fail or hang",
    )
    doctor_cmd.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help=f"--collectives: stop every rank and explain after this long (default {collectives.DEFAULT_TIMEOUT_S:g})",
    )
    recipe_command("show", "print a recipe as resolved (defaults and overrides applied)")
    recipe_command("validate", "check a recipe and its local data; print the resolved recipe")
    run_help = "a run's output folder, or the recipe that ran (default: $RECIPE)"
    export = sub.add_parser("export", help="export a finished run: merged 16-bit model, GGUF files (one process)")
    export.add_argument("target", nargs="?", metavar="RUN_DIR|RECIPE", help=run_help)
    export.add_argument(
        "--to",
        nargs="+",
        required=True,
        metavar="KIND",
        help=f"adapter, merged_16bit, gguf[:QUANT,...] (QUANT: {', '.join(exports.GGUF_QUANTS)}; default q8_0)",
    )
    export.add_argument(
        "--no-check",
        action="store_true",
        help="skip checking each merged / GGUF export against the trained model (perplexity on held-out rows, "
        "the chat template)",
    )
    generate = sub.add_parser("generate", help="try a run: answer a prompt, or chat on the terminal (one process)")
    generate.add_argument("target", nargs="?", metavar="RUN_DIR|RECIPE", help=run_help)
    generate.add_argument("--prompt", help="one prompt; without it, a chat on stdin (an empty line ends it)")
    generate.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    generate.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    generate.add_argument("--image", metavar="FILE", help="a vision run: the image the prompt asks about")
    return parser


def split_args(argv: list[str]) -> list[str]:
    """`entrypoint RECIPE ...` means `entrypoint run RECIPE ...`."""
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        return ["run", *argv]
    return argv


def recipe_name(args: argparse.Namespace, request: environment.Request) -> str:
    name = args.recipe or request.recipe
    if not name:
        known = ", ".join(catalog.bundled())
        raise BadInput(f"no recipe given; name one (bundled: {known}) or set RECIPE")
    # A positional that looks like key=value is an override, with the recipe from $RECIPE.
    if "=" in name and request.recipe:
        args.overrides.insert(0, name)
        return request.recipe
    return name


def build_plan(args: argparse.Namespace) -> Plan:
    """The one gate: the environment (a Request) and this machine's facts (a Host) are read here,
    then handed to the pure planner."""
    environ = dict(os.environ)
    request = environment.read(environ)
    loaded = catalog.load(recipe_name(args, request), args.overrides)
    facts = host.gather(environ, loaded.recipe, os.getcwd(), assume_gpus=args.assume_gpus)
    if facts.note:
        print(f"note: {facts.note}", file=sys.stderr)
    return make(request, loaded, facts)


def build_followup(args: argparse.Namespace) -> Plan:
    """export / generate: the run, then a one-process plan (entrypoint/followup.py)."""
    environ = dict(os.environ)
    request = environment.read(environ)
    target = args.target or request.recipe
    if not target:
        raise BadInput(
            f"no run given; name a run's output folder or the recipe that ran, or set RECIPE ({args.command})"
        )
    run = followup.find_run(target, request, os.getcwd())
    facts = host.gather(environ, run.recipe, os.getcwd(), model=run.base_model())
    if args.command == "export":
        return followup.export_plan(request, run, exports.parse_targets(args.to), facts, check=not args.no_check)
    options = [f"--max-new-tokens={args.max_new_tokens}", f"--temperature={args.temperature}"]
    options += [f"--prompt={args.prompt}"] if args.prompt else []
    return followup.generate_plan(request, run, facts, options, args.image)


def check_collectives(args: argparse.Namespace) -> int:
    """doctor --collectives: the environment read as for a run, this machine's GPUs, then the check."""
    if not args.collectives:
        raise BadInput(f"--timeout {args.timeout:g} applies to doctor --collectives; add --collectives")
    environ = dict(os.environ)
    request = environment.read(environ)
    timeout = collectives.DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    return collectives.main(environ, request, gpus.discover(environ), sys.executable, timeout, args.json)


def print_plan(plan: Plan) -> None:
    print(f"recipe      {plan.recipe} ({plan.recipe_file})")
    print(f"mode        {plan.mode}: {plan.reason}")
    where = f"GPUs {','.join(plan.gpu_ids)}" if plan.gpu_ids else "CPU"
    print(f"processes   {plan.num_processes} on {where}; device_map {json.dumps(plan.device_map)}")
    print(f"precision   {plan.mixed_precision}")
    if plan.resume is not None:
        print(f"resume      {plan.resume['summary']}")
    if plan.generation is not None:
        print(f"generation  {plan.generation} (training.grpo.generation){generation_memory(plan)}")
    for line in memory_lines(plan.mode, plan.memory):
        print(line)
    for index, line in enumerate(datareport.lines([datareport.SourceReport(**r) for r in plan.data])):
        print(("data        " if index == 0 else " " * 12) + line)
    print(f"output      {plan.output_dir}")
    for warning in plan.warnings:
        print(f"warning     {warning}")
    print("env         " + " ".join(f"{k}={v}" for k, v in plan.env.items()))
    print("command     " + " ".join(plan.command))
    if plan.accelerate_config is not None:
        print("accelerate config:")
        for key, value in plan.accelerate_config.items():
            print(f"  {key}: {json.dumps(value)}")


def generation_memory(plan: Plan) -> str:
    """What generating GRPO's completions holds, within the estimate's activations."""
    held = plan.memory.get("generation_gib")
    if held is None or plan.memory.get("params_b") is None:
        return ""
    cache = plan.paged_cache
    if cache is None:
        return f"; ~{held} GiB of KV cache"
    return (
        f"; ~{held} GiB: a paged KV cache of {cache['num_blocks']} blocks x {cache['block_size']} tokens, "
        f"and passes of up to {cache['max_batch_tokens']} tokens"
    )


def memory_lines(mode: str, mem: dict) -> list[str]:
    """The plan's per-GPU memory: the estimate, under fsdp how it loads, and the other modes' figures."""
    if mem.get("params_b") is None:
        return []
    lines = [
        f"memory      ~{mem['per_gpu_gib']} GiB per GPU ({mem['params_b']}B parameters from {mem['source']}; "
        f"one copy: weights {mem['weights_gib']}, trainable {mem['trainable_gib']}, "
        f"activations {mem['activations_gib']}, total {mem['total_gib']})"
    ]
    if mode == "fsdp":
        how = (
            f"each rank loads the whole {mem['weights_gib']} GiB of {mem['load_in']} weights before FSDP2 "
            f"shards them (only 16-bit weights load shard by shard)"
            if mem["quantized"]
            else "each rank reads its share of the 16-bit weights (sharded loading)"
        )
        lines.append(
            f"            loading ~{mem['load_per_gpu_gib']} GiB per GPU: {how}; training ~{mem['train_per_gpu_gib']}"
        )
    others = ", ".join(f"{m} ~{gib} GiB" for m, gib in mem.get("alternatives_per_gpu_gib", {}).items())
    if others:
        lines.append(f"            per GPU in the other modes: {others}")
    return lines


def list_recipes() -> None:
    rows = []
    for name, path in catalog.bundled().items():
        recipe = catalog.load(str(path)).recipe
        rows.append(
            (
                name,
                recipe.model.name,
                recipe.training.method,
                recipe.description.strip().splitlines()[0] if recipe.description.strip() else "",
            )
        )
    width = max(len(r[0]) for r in rows)
    model_width = max(len(r[1]) for r in rows)
    for name, model, method, description in rows:
        print(f"{name:<{width}}  {method:<4}  {model:<{model_width}}  {description}")


def main(argv: Sequence[str] | None = None) -> int:
    started_at = time.time()
    argv = split_args(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            print("\nbundled recipes:")
            list_recipes()
            return 0
        if args.command == "list":
            list_recipes()
            return 0
        if args.command == "doctor" and (args.collectives or args.timeout is not None):
            return check_collectives(args)
        if args.command == "doctor":
            facts = doctor.collect(os.environ)
            print(json.dumps(dataclasses.asdict(facts), indent=2) if args.json else doctor.render(facts))
            return 0
        if args.command in ("show", "validate"):
            request = environment.read(os.environ)
            loaded = catalog.load(recipe_name(args, request), args.overrides)
            if args.command == "validate":
                print(f"# {loaded.path}: valid", file=sys.stderr)
                files = host.tokenizer_files(loaded.recipe, os.environ)
                for line in datareport.lines(datareport.report(loaded.recipe, loaded.samples, files)):
                    print(f"# {line}", file=sys.stderr)
            print(catalog.to_yaml(loaded.recipe), end="")
            return 0
        if args.command in ("export", "generate"):
            plan = build_followup(args)
            sys.stdout.flush()
            return launch.execute(plan, started_at)
        plan = build_plan(args)
        if args.command == "plan":
            if args.json:
                print(json.dumps(plan.as_json(), indent=2))
            else:
                print_plan(plan)
            return 0
        print_plan(plan)
        sys.stdout.flush()
        return launch.execute(plan, started_at)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
