"""``edgeship``: the workstation CLI (keys, build, verify, inspect).

Only this module talks to users; see :mod:`agent.cliutil` for the error handler.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from agent import __version__
from agent.bundle import describe, opened_bundle
from agent.cliutil import echo_json, json_option, password_from_env, run_cli
from agent.errors import UsageError
from agent.keys import TrustedKey, load_public_key
from packager.gate import QUANTIZE_CHOICES

path_in = click.Path(path_type=Path, dir_okay=False)


def _passphrase(env: str | None) -> bytes | None:
    value = password_from_env(env, option="--passphrase-env")
    if value is None:
        return None
    if not value:
        raise UsageError(f"environment variable {env} is empty; a passphrase cannot be empty")
    return value.encode("utf-8")


def _trusted(keys: tuple[Path, ...]) -> list[TrustedKey]:
    return [load_public_key(k) for k in keys]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeship")
def cli() -> None:
    """edgeship: build signed, quantized model bundles and ship them to devices."""


@cli.group()
def keys() -> None:
    """Manage signing keys."""


@keys.command("generate")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False), help="Directory for the key pair.")
@click.option("--name", default="release", show_default=True, help="Base name: NAME.key and NAME.pub.")
@click.option("--passphrase-env", metavar="VAR", help="Encrypt the private key with the passphrase in this environment variable.")
@click.option("--force", is_flag=True, help="Overwrite an existing key pair.")
@json_option
def keys_generate(out_dir: Path, name: str, passphrase_env: str | None, force: bool, as_json: bool) -> None:
    """Create an ECDSA P-256 key pair and print its key id."""
    from packager.keys import generate_keypair

    out_dir.mkdir(parents=True, exist_ok=True)
    gen = generate_keypair(out_dir, name=name, passphrase=_passphrase(passphrase_env), force=force)
    if as_json:
        echo_json({"key_id": gen.key_id, "private_key": str(gen.private_path), "public_key": str(gen.public_path),
                   "encrypted": passphrase_env is not None})
    else:
        click.echo(f"key id:      {gen.key_id}")
        click.echo(f"private key: {gen.private_path} (mode 0600{', encrypted' if passphrase_env else ''})")
        click.echo(f"public key:  {gen.public_path}")


@cli.command()
@click.argument("model", type=path_in)
@click.option("--name", required=True, help="Model name (a-z 0-9 . _ -).")
@click.option("--version", "version", required=True, help="Semantic version, e.g. 1.0.0.")
@click.option("--key", "key_path", required=True, type=path_in, help="Private signing key (PEM).")
@click.option("--passphrase-env", metavar="VAR", help="Environment variable holding the key's passphrase.")
@click.option("--target", type=click.Choice(["onnx", "tflite"]), help="Runtime the device will use (default: the model's own).")
@click.option("--quantize", type=click.Choice(QUANTIZE_CHOICES), default="none",
              show_default=True, help="Quantization; auto tries every mode that applies and keeps the smallest, then fastest, that passes the gate.")
@click.option("--calibration", type=path_in, help=".npz of representative inputs (static int8 needs it).")
@click.option("--eval", "eval_path", type=path_in, help=".npz of evaluation inputs, with 'labels' when there are any.")
@click.option("--max-accuracy-drop", default=1.0, show_default=True, type=click.FloatRange(0, 100),
              help="Percentage points of accuracy a result may lose against the float model (labelled --eval).")
@click.option("--min-cosine", default=0.99, show_default=True, type=click.FloatRange(-1, 1),
              help="Minimum cosine similarity to the float model's outputs (unlabelled --eval).")
@click.option("--activation-type", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
              help="Activation type of ONNX static int8.")
@click.option("--per-tensor", is_flag=True, help="Quantize weights per tensor instead of per channel.")
@click.option("--labels", type=path_in, help="Class labels, one per line.")
@click.option("--sample-inputs", type=path_in, help=".npz of self-test inputs (one array per input, samples on axis 0).")
@click.option("--selftest-cases", default=4, show_default=True, type=click.IntRange(1, 64), help="Number of golden self-test cases.")
@click.option("--arch", default="any", show_default=True, help="Target CPU architecture (x86_64, aarch64, ... or any).")
@click.option("--accelerator", help="Target accelerator or delegate, if any.")
@click.option("--min-runtime", help="Override the minimum runtime version recorded in the manifest.")
@click.option("-o", "--out", type=click.Path(path_type=Path, dir_okay=False), help="Output file (default ./NAME-VERSION.edge).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@json_option
def build(model: Path, name: str, version: str, key_path: Path, passphrase_env: str | None, target: str | None,
          quantize: str, calibration: Path | None, eval_path: Path | None, max_accuracy_drop: float, min_cosine: float,
          activation_type: str, per_tensor: bool, labels: Path | None, sample_inputs: Path | None, selftest_cases: int,
          arch: str, accelerator: str | None, min_runtime: str | None, out: Path | None, force: bool,
          as_json: bool) -> None:
    """Build a signed bundle from an ONNX or TFLite MODEL, optionally converted and quantized behind the gate."""
    import tempfile

    from packager.build import BuildRequest, build_bundle
    from packager.gate import GateConfig, GateFailed
    from packager.keys import load_private_key
    from packager.optimize import OptimizeRequest, optimize
    from packager.progress import default_reporter
    from packager.report import render_report

    if not model.is_file():
        raise UsageError(f"model not found: {model}")
    for flag, p in (("--calibration", calibration), ("--eval", eval_path), ("--labels", labels),
                    ("--sample-inputs", sample_inputs)):
        if p is not None and not p.is_file():
            raise UsageError(f"{flag} file not found: {p}")
    signing_key = load_private_key(key_path, passphrase=_passphrase(passphrase_env))
    base = BuildRequest(model=model, name=name, version=version, out=out, labels=labels, sample_inputs=sample_inputs,
                        selftest_cases=selftest_cases, arch=arch, accelerator=accelerator, min_runtime=min_runtime,
                        force=force)
    if base.output_path().exists() and not force:
        raise UsageError(f"{base.output_path()} already exists; pass --force to replace it (a released version should never change)")
    reporter = default_reporter()
    oreq = OptimizeRequest(source=model, target=target, quantize=quantize, calibration=calibration,  # type: ignore[arg-type]
                           eval=eval_path, activation_type=activation_type,  # type: ignore[arg-type]
                           per_channel=not per_tensor,
                           gate=GateConfig(max_accuracy_drop=max_accuracy_drop, min_cosine=min_cosine))
    with tempfile.TemporaryDirectory(prefix="edgeship-optimize-") as work:
        try:
            opt = optimize(oreq, Path(work), reporter=reporter)
        except GateFailed as e:
            if e.report is not None and not as_json:
                render_report(e.report, stderr=True)
            raise
        if opt.report is not None and not as_json:
            render_report(opt.report, stderr=True)
        req = replace(base, model=opt.path, quantization_report=opt.report, quantized=opt.quantized,
                      min_runtime=min_runtime or opt.min_runtime_version)
        result = build_bundle(req, signing_key, reporter=reporter, model_info=opt.info)
    summary = {
        "bundle": str(result.path),
        "size": result.bundle_size,
        "sha256": result.bundle_sha256,
        "name": result.manifest.name,
        "version": result.manifest.version,
        "runtime": result.manifest.runtime.name,
        "min_runtime": result.manifest.runtime.min_version,
        "device_class": str(result.manifest.device_class),
        "signer": result.signer,
        "transfer_signature": str(result.transfer_signature),
        "signed_files": [{"name": n, "size": s, "sha256": d} for n, (s, d) in result.files.items()],
        "selftest": dict(result.selftest),
        "quantization": opt.report,
    }
    if as_json:
        echo_json(summary)
        return
    click.echo(f"built {result.path} ({result.bundle_size} bytes)")
    click.echo(f"  {result.manifest.name} {result.manifest.version}  runtime {result.manifest.runtime.name} >= "
               f"{result.manifest.runtime.min_version}  device {result.manifest.device_class}"
               + (f"  model: {opt.report['chosen']}" if opt.report else ""))
    click.echo(f"  signed by {result.signer}; signed files:")
    for n, (s, d) in result.files.items():
        click.echo(f"    {d[:16]}  {s:>10}  {n}")
    click.echo(f"  self-test: {result.selftest['cases']} case(s), tolerance rtol={result.selftest['rtol']:g} atol={result.selftest['atol']:g}")
    click.echo(f"  transfer signature: {result.transfer_signature} (publish it with the bundle)")


def _print_description(d: dict[str, Any]) -> None:
    click.echo(f"{d['name']} {d['version']}  (bundle format {d['format']}, created {d['created']})")
    rt = d["runtime"]
    dc = d["device_class"]
    click.echo(f"  runtime:  {rt['name']} >= {rt['min_version']}")
    click.echo(f"  device:   {dc['arch']}{' + ' + dc['accelerator'] if dc['accelerator'] else ''}")
    if d.get("signer"):
        state = "verified" if d.get("verified") else "NOT verified (no --key given)"
        click.echo(f"  signer:   {d['signer']} ({state})")
    for kind in ("inputs", "outputs"):
        for t in d[kind]:
            q = t.get("quantization")
            qs = f"  q(scale={q['scale'][0]:g}, zp={q['zero_point'][0]})" if q else ""
            click.echo(f"  {kind[:-1]:<8}  {t['name']}: {t['dtype']}{t['shape']}{qs}")
    st = d["selftest"]
    click.echo(f"  selftest: {st['cases']} case(s), rtol={st['rtol']:g} atol={st['atol']:g}")
    if d.get("quantization"):
        click.echo(f"  quantization: {d['quantization'].get('mode', 'see --json')}")
    click.echo("  files:")
    for f in d["files"]:
        click.echo(f"    {f['sha256'][:16]}  {f['size']:>10}  {f['name']}")


@cli.command()
@click.argument("bundle", type=path_in)
@click.option("--key", "keys_", multiple=True, required=True, type=path_in, help="Trusted public key (repeatable).")
@json_option
def verify(bundle: Path, keys_: tuple[Path, ...], as_json: bool) -> None:
    """Exit 0 only if BUNDLE is intact and signed by one of the --key public keys."""
    trusted = _trusted(keys_)
    with opened_bundle(bundle, trusted_keys=trusted) as vb:
        d = describe(vb, bundle_file=bundle)
    if as_json:
        echo_json(d)
    else:
        click.echo(f"OK: {bundle.name}: {d['name']} {d['version']} intact, signed by {d['signer']}")


@cli.command()
@click.argument("bundle", type=path_in)
@click.option("--key", "keys_", multiple=True, type=path_in, help="Trusted public key; with it the signature is verified too.")
@json_option
def inspect(bundle: Path, keys_: tuple[Path, ...], as_json: bool) -> None:
    """Show a bundle's manifest, files, signer and self-test."""
    from agent.bundle import inspect_bundle

    d = inspect_bundle(bundle, trusted_keys=_trusted(keys_))
    if as_json:
        echo_json(d)
    else:
        _print_description(d)


def _register() -> None:
    from packager.demo_cli import demo
    from packager.fleet_cli import fleet
    from packager.repo_cli import publish, repo
    from packager.serve_cli import serve

    for command in (repo, publish, serve, fleet, demo):
        cli.add_command(command)


_register()


def main(args: list[str] | None = None) -> None:
    run_cli(cli, "edgeship", args)


if __name__ == "__main__":
    main()
