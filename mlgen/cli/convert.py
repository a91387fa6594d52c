"""``mlgen convert import-hf SRC WORKDIR`` | ``export-hf WORKDIR DST`` | ``merge-lora WORKDIR
DST``: Hugging Face models to run directories and back, LoRA runs to plain ones
(``mlgen.convert.run``)."""

from __future__ import annotations

from mlgen.cli.args import Parser
from mlgen.convert.run import export_run, import_run, merge_lora_run


def convert_main(argv: list[str]) -> int:
    ap = Parser(
        prog="mlgen convert", description="Convert Hugging Face models to mlgen runs and back."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="a Hugging Face model directory -> a run directory")
    imp.add_argument("src", help="config.json + safetensors weights + tokenizer")
    imp.add_argument("workdir", help="the new run directory")
    imp.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    imp.add_argument(
        "overrides", nargs="*", default=[], help="run config overrides, e.g. data.seq_len=512"
    )
    exp = sub.add_parser("export-hf", help="a run directory -> a Hugging Face model directory")
    exp.add_argument("workdir")
    exp.add_argument("dst")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    exp.add_argument("--no-ema", action="store_true", help="the raw parameters, not their EMA")
    merge = sub.add_parser(
        "merge-lora", help="a LoRA run -> a run with the adapters folded into its weights"
    )
    merge.add_argument("workdir")
    merge.add_argument("dst", help="the new run directory")
    merge.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    merge.add_argument("--no-ema", action="store_true", help="the raw parameters, not their EMA")
    a = ap.parse_args(argv)
    if a.command == "import-hf":
        cfg = import_run(a.src, a.workdir, dtype=a.dtype, overrides=a.overrides)
        m = cfg.model
        print(
            f"wrote {cfg.workdir}: {m.flavour} transformer, {m.num_layers} layers, d_model "
            f"{m.d_model}, vocab {m.vocab_size} (mlgen generate {cfg.workdir} --prompt ...)"
        )
    elif a.command == "merge-lora":
        cfg = merge_lora_run(a.workdir, a.dst, step=a.step, ema=not a.no_ema)
        print(
            f"wrote {cfg.workdir}: the adapters folded into the weights, model.lora_rank=0 "
            f"(mlgen convert export-hf {cfg.workdir} DST)"
        )
    else:
        export_run(a.workdir, a.dst, step=a.step, ema=not a.no_ema)
        print(f"wrote {a.dst}: config.json + model.safetensors")
    return 0
