"""`python -m build_engines …`: make checkpoints (and, later, engines and model repositories)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpu_engine.errors import EngineError


def _checkpoint(args: argparse.Namespace) -> Path:
    from build_engines.gguf_checkpoint import convert_gguf
    from build_engines.reference_model import ensure_reference_checkpoint

    if args.reference:
        return ensure_reference_checkpoint(args.out)
    return convert_gguf(args.from_gguf, args.out)


def _tiny(args: argparse.Namespace) -> Path:
    from build_engines.tiny_checkpoints import TokenizerStyle, write_tiny_checkpoint

    return write_tiny_checkpoint(args.out, TokenizerStyle(args.style), seed=args.seed)


def _repository(args: argparse.Namespace) -> Path:
    from build_engines.plan import read_checkpoint
    from build_engines.repository import RepositorySettings, render_repository

    if args.target != "cpu":
        raise EngineError(f"target {args.target!r} is not available yet; available: cpu")
    read_checkpoint(args.checkpoint)
    return render_repository(RepositorySettings(checkpoint_dir=str(args.checkpoint.resolve())), args.out)


def _build(args: argparse.Namespace) -> Path:
    from build_engines.build import main_build

    return main_build(
        args.target,
        args.checkpoint,
        args.out,
        args.dry_run,
        args.model_id or args.checkpoint.name,
        args.targets,
        args.endpoint,
        args.lora,
        args.calib_dataset,
    )


def _adapter(args: argparse.Namespace) -> str:
    """Register a PEFT LoRA adapter as a custom model on a base model of the gateway's config (by default the
    embedded reference model of `make serve`). A running gateway serves it at once: it shares the store."""
    from build_engines.adapter_store import AdapterStore
    from gateway.settings import GatewaySettings

    if args.config is not None:
        settings = GatewaySettings.from_file(args.config)
    else:
        from build_engines.reference_model import ensure_reference_checkpoint
        from gateway.embedded import embedded_settings

        settings = embedded_settings(ensure_reference_checkpoint(), "127.0.0.1:8001")
    store = AdapterStore(settings.adapter_store)
    if args.remove:
        if not store.remove(args.id):
            raise EngineError(f"custom model '{args.id}' is not registered in {store.root}")
        return f"removed {args.id}"
    if args.base is None or args.adapter is None:
        raise EngineError("registering needs --base MODEL_ID and --adapter DIR")
    models = {m.id: m for m in settings.models}
    base = models.get(args.base)
    if base is None:
        raise EngineError(f"base model '{args.base}' is not in the gateway's models ({', '.join(models)})")
    stored = store.register(args.id, base.id, base.tokenizer_dir, base.lora_support, args.adapter, set(models))
    return (
        f"registered {stored.id} on {stored.base_model} (rank {stored.rank}, modules {' '.join(stored.target_modules)},"
        f" LoRA task id {stored.task_id}) in {store.root}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m build_engines", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    checkpoint = commands.add_parser("checkpoint", help="write a Hugging Face checkpoint directory")
    source = checkpoint.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-gguf", type=Path, metavar="PATH", help="convert this GGUF file")
    source.add_argument("--reference", action="store_true", help="convert the SmolLM2-135M-Instruct reference")
    checkpoint.add_argument("--out", type=Path, required=True, metavar="DIR")
    checkpoint.set_defaults(run=_checkpoint)

    tiny = commands.add_parser("tiny", help="write a tiny random-weight test checkpoint")
    tiny.add_argument("--style", choices=["byte_bpe", "sentencepiece"], required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--out", type=Path, required=True, metavar="DIR")
    tiny.set_defaults(run=_tiny)

    repository = commands.add_parser("repository", help="render a Triton model repository for a checkpoint")
    repository.add_argument("--checkpoint", type=Path, required=True, metavar="DIR")
    repository.add_argument("--target", default="cpu", help="deployment target (cpu)")
    repository.add_argument("--out", type=Path, required=True, metavar="REPO")
    repository.set_defaults(run=_repository)

    from build_engines.targets import TARGETS_FILE

    build = commands.add_parser("build", help="build an engine for a target and render its repository")
    build.add_argument("--checkpoint", type=Path, required=True, metavar="DIR")
    build.add_argument("--target", required=True, help="a target name from the targets file")
    build.add_argument("--out", type=Path, required=True, metavar="REPO")
    build.add_argument("--dry-run", action="store_true", help="print the plan and render the repository only")
    build.add_argument("--model-id", help="public model id for the gateway entry (default: checkpoint folder name)")
    build.add_argument("--targets", type=Path, default=TARGETS_FILE, help="targets file (default: the bundled one)")
    build.add_argument(
        "--endpoint", default="127.0.0.1:8001", help="Triton gRPC address (host:port) written into the gateway entry"
    )
    build.add_argument(
        "--lora", action="store_true", help="build with LoRA (the target's lora_* limits) to serve adapters by id"
    )
    build.add_argument(
        "--calib-dataset", metavar="NAME_OR_DIR",
        help="FP8 targets: the calibration set quantize.py reads (default: its own, downloaded from Hugging Face; "
        "give a local copy on a cluster without internet access)",
    )  # fmt: skip
    build.set_defaults(run=_build)

    adapter = commands.add_parser("adapter", help="register (or --remove) a LoRA adapter as a custom model id")
    adapter.add_argument("--id", required=True, help="the custom model id requests will name")
    adapter.add_argument("--base", metavar="MODEL_ID", help="the served base model the adapter was trained on")
    adapter.add_argument("--adapter", type=Path, metavar="DIR", help="a PEFT adapter directory")
    adapter.add_argument("--config", type=Path, help="the gateway's config file (default: the embedded `make serve`)")
    adapter.add_argument("--remove", action="store_true", help="remove the custom model instead")
    adapter.set_defaults(run=_adapter)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = args.run(args)
    except (EngineError, ValueError, OSError) as error:  # OSError: paths (a file given as --out, a full disk)
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0
