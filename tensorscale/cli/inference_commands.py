"""The commands that run a model: `gen` and `verify` (and the text `up --verify` prints).

They live apart from main.py because they need torch and transformers; everything is imported inside the
command bodies, so registering them keeps `tensorscale --help` and `desc` free of both.
"""

from __future__ import annotations

import json
import math
import sys

import click

from ..errors import TensorscaleError
from .options import model_input

EXIT_FAILED = 1


@click.command()
@model_input("Model folder (with tokenizer files), or a Hugging Face hub id.")
@click.option("--prompt", "-p", default="The capital of France is", show_default=True, help="Text to complete.")
@click.option("--n-predict", "-n", type=int, default=100, show_default=True, help="Tokens to generate (fewer at EOS).")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="Sampling temperature.")
@click.option("--top-k", type=int, default=40, show_default=True, help="Sample from the k likeliest tokens (0: all).")
@click.option("--top-p", type=float, default=0.9, show_default=True, help="Nucleus sampling mass.")
@click.option("--greedy", is_flag=True, help="Always take the likeliest token (deterministic; ignores the sampling knobs).")
@click.option("--seed", type=int, default=None, help="Seed for sampling (default: a fresh one, reported with --json).")
@click.option("--json", "as_json", is_flag=True, help="Print {prompt, completion, tokens, ...} as JSON instead of streaming.")
def gen(source, prompt, n_predict, temperature, top_k, top_p, greedy, seed, as_json):
    """Complete a prompt with a model, streaming tokens as they are generated.

    \b
    Example:
      tensorscale gen examples/pydoc-llama -p "Return the" -n 30 --greedy
    """
    from ..inference.generate import Settings, generate

    settings = Settings(n_predict, temperature, top_k, top_p, greedy, seed)
    if as_json:
        click.echo(json.dumps(generate(source, prompt, settings), indent=2))
        return
    settings.check()  # before the prompt is printed, so a bad option is the only output

    started = []

    def stream(text):
        if not started:
            click.echo(prompt, nl=False)
            started.append(True)
        click.echo(text, nl=False)
        sys.stdout.flush()

    result = generate(source, prompt, settings, on_text=stream)
    if not started:
        click.echo(prompt, nl=False)
    click.echo()
    if not greedy:
        click.echo(f"[{result['tokens']} tokens, seed {result['seed']}]", err=True)


@click.command()
@click.argument("paths", nargs=-1, metavar="[SRC DST]")
@click.option("--input", "-i", "source", default=None, metavar="SRC", help="The reference model.")
@click.option("--output", "-o", "output", default=None, metavar="DST", help="The model that should compute the same function.")
@click.option("--text", "text_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Compare on this text (one sequence per paragraph) instead of the built-in prompts.")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="Pass mark on max|Δlogit| / max|logit|; exit status 1 beyond it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random token ids used when there is no tokenizer.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON for scripts.")
def verify(paths, source, output, text_path, tolerance, seed, as_json):
    """Prove two checkpoints compute the same function: run both on the same tokens and compare logits.

    \b
    Reports max|Δlogit| (absolute and relative to max|logit|), KL(SRC‖DST),
    top-1 agreement and each model's perplexity. Exit status 0 within
    --tolerance, 1 beyond it, 2 when the two cannot be compared.
    \b
    Examples:
      tensorscale verify ./tiny-llama ./tiny-llama-x2
      tensorscale verify -i ./tiny-llama -o ./tiny-llama-x2 --text notes.txt --json
    """
    from ..inference.verify import read_texts, verify as run_verify

    source, output = _two_models(paths, source, output)
    texts = read_texts(text_path) if text_path else None
    report = run_verify(source, output, texts=texts, tolerance=tolerance, seed=seed)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else verify_text(report))
    if not report.passed:
        sys.exit(EXIT_FAILED)


def _two_models(paths, source, output):
    if paths and (source or output):
        raise TensorscaleError("give the two models either as SRC DST or as --input/--output, not both")
    if paths:
        if len(paths) != 2:
            raise TensorscaleError(f"verify compares two models; got {len(paths)} path(s): tensorscale verify SRC DST")
        return paths
    if not source or not output:
        raise TensorscaleError("verify needs two models: tensorscale verify SRC DST (or --input SRC --output DST)")
    return source, output


def verify_text(report) -> str:
    """The verify report for people: numbers first, the verdict last."""

    def number(value):
        return "n/a" if value is None else f"{value:.4g}"

    verdict = "PASS" if report.passed else "FAIL"
    relation = "<=" if report.passed else ("is NaN, not <=" if math.isnan(report.relative_logit_error) else ">")
    lines = [
        f"verify {report.source} -> {report.output}",
        f"  inputs                 {report.inputs}; {report.positions} positions",
        f"  max |Δlogit|           {number(report.max_abs_logit_diff)}  (max |logit| {number(report.max_abs_logit)})",
        f"  relative logit error   {number(report.relative_logit_error)}",
        f"  KL(src ‖ dst)          {number(report.kl_mean)} nats per position",
        f"  top-1 agreement        {report.top1_agreement:.2%}",
        f"  perplexity             src {number(report.perplexity_source)}, dst {number(report.perplexity_output)}",
        f"{verdict}: relative logit error {number(report.relative_logit_error)} {relation} tolerance {report.tolerance:g}"
        if not getattr(report, "nonfinite", None) else f"FAIL: {report.nonfinite}",
    ]
    return "\n".join(lines)
