"""The ``gossipfl`` commands that need no daemon: models, training, evaluation, prediction, certificates,
the config check and the systemd service; each with the function that registers its subcommands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gossipfl.cli.argtypes import int_list, name_list, positive_float, positive_int, value_range
from gossipfl.cli.certs import describe_certificate, init_ca, issue_node_cert
from gossipfl.cli.cli_anomaly import (
    add_threshold_options,
    evaluate_anomalies,
    predict_anomalies,
    refuse_misplaced_options,
)
from gossipfl.cli.cli_control import connection_options, predict_via_daemon
from gossipfl.cli.service import CONFIG_PATH, UNIT_NAME, ServiceReport, install, uninstall
from gossipfl.cli.tls import load_identity
from gossipfl.config import check_named_files, load_config
from gossipfl.errors import DataError, GossipflError
from gossipfl.identity.ids import format_node_id
from gossipfl.identity.node import CA_DAYS, CA_KEY, NODE_DAYS, node_id_from_cert_file
from gossipfl.learning.data import DataSpec, LocalData, load_directory, read_file, survey_directory
from gossipfl.learning.model import Model
from gossipfl.learning.optim import OPTIMIZERS, OptimizerConfig
from gossipfl.learning.privacy_budget import PRIVACY_KEY
from gossipfl.learning.quality import class_probabilities, predicted_classes
from gossipfl.learning.trainer import Metrics, TrainConfig, Trainer, predict
from gossipfl.learning.zoo import ARCHITECTURES, ArchSpec, autoencoder_hidden, build, range_scaling


def _data_spec(model: Model, label_column: str | None) -> DataSpec:
    return DataSpec.of(model, label_column)


def _classes(model: Model) -> tuple[str, ...] | None:
    return model.schema.classes if model.schema is not None else None


def _privacy_guarantee(model: Model) -> dict[str, Any] | None:
    """The guarantee a model file records, checked as hostile: a dict of the expected numbers, else None."""
    try:
        found = json.loads(model.metadata.get(PRIVACY_KEY, "null"))
    except (ValueError, RecursionError):
        return None
    numbers = ("epsilon", "delta", "noise_multiplier", "clip", "steps")
    if not isinstance(found, dict) or not all(isinstance(found.get(k), int | float) for k in numbers):
        return None
    return found


def _metrics_line(m: Metrics) -> str:
    if m.accuracy is None:
        return f"rmse {m.rmse:.4f}  loss {m.loss:.4f}  samples {m.count}"
    balanced = m.balanced_accuracy
    return (f"accuracy {m.accuracy:.4f}  balanced accuracy {balanced if balanced is not None else float('nan'):.4f}  "
            f"loss {m.loss:.4f}  samples {m.count}")


def _note_skipped(data: LocalData) -> None:
    """Rows the files held that were not used, on stderr, so a quiet loss of data is never quiet."""
    skipped = data.skipped_rows
    if skipped:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
        print(f"note: skipped {sum(skipped.values())} rows ({reasons})", file=sys.stderr)


# ---------------------------------------------------------------- commands


def cmd_model_init(args: argparse.Namespace) -> int:
    task = args.task or ("anomaly" if args.arch == "autoencoder" else "classification")
    shape = tuple(args.input_shape) if args.input_shape else None
    if shape is not None and len(shape) != 2:
        raise DataError("--input-shape takes two numbers: channels,length")
    survey = None
    if args.data is not None:  # the columns, classes and scaling come from the data
        if args.inputs is not None or args.classes is not None:
            raise DataError("--data reads the inputs and classes from the data: drop --inputs and --classes")
        if args.features and args.exclude:
            raise DataError("give --features or --exclude, not both")
        # An anomaly model's data needs no label column, unless one is named (a typo must not make it a feature).
        survey = survey_directory(args.data, args.label_column or "label", task, args.features,
                                  args.exclude or (), args.delimiter,
                                  require_label=task != "anomaly" or args.label_column is not None)
        inputs = len(survey.schema.features)
        classes = len(survey.schema.classes) if survey.schema.classes else 1
    else:
        if args.inputs is None:
            raise DataError("--inputs is required without --data")
        inputs = args.inputs
        classes = args.classes if args.classes is not None else (1 if task == "regression" else None)
        if classes is None and task != "anomaly":
            raise DataError("--classes is required for a classifier (or give --data)")
    if task == "anomaly":
        if args.classes is not None:
            raise DataError("an autoencoder has as many outputs as inputs: drop --classes")
        classes = inputs
    hidden = args.hidden if args.hidden is not None else (
        [8, 16] if args.arch == "cnn1d" else list(autoencoder_hidden(inputs)) if args.arch == "autoencoder" else [128])
    if args.input_range is not None and args.no_scaling:
        raise DataError("--input-range sets the scaling: drop --no-scaling")
    scaling = range_scaling(*args.input_range, inputs) if args.input_range is not None else \
        (survey.mean, survey.scale) if survey and not args.no_scaling else None
    spec = ArchSpec(arch=args.arch, inputs=inputs, classes=classes, hidden=hidden, input_shape=shape,  # type: ignore[arg-type]
                    task=task, seed=args.seed, schema=survey.schema if survey else None, scaling=scaling)
    model = build(spec)
    Trainer(model)  # proves the new model trains before it is written
    model.save(args.out)
    print(f"wrote {args.out}: {model.describe()}")
    if survey is not None:
        names = survey.schema.classes
        print(f"  features ({inputs}): {', '.join(survey.schema.features)}")
        print(f"  label {survey.schema.label!r}" + (f", classes ({len(names)}): {', '.join(names)}" if names else "")
              + (" (not needed to train; never a feature; eval --anomaly-label reads it)" if task == "anomaly" else ""))
        how = "no scaling of" if args.no_scaling else "read" if args.input_range else \
            "standardised with the mean and spread of"
        print(f"  {how} {survey.rows} rows" + (f"; skipped rows: {survey.skipped}" if survey.skipped else ""))
    if args.input_range is not None:
        print(f"  every feature scaled from {args.input_range[0]:g}..{args.input_range[1]:g} to -1..1 "
              "(fixed constants: no row read for them)")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    model = Model.load(args.model)
    Trainer(model)
    info = {"task": model.task, "input": model.input_name, "input_shape": list(model.input_shape),
            "output": model.output_name, "outputs": model.num_outputs, "parameters": model.num_params,
            "tensors": {s.name: list(s.shape) for s in model.specs}, "fingerprint": model.fingerprint_hex,
            "privacy": _privacy_guarantee(model)}
    if args.json:
        print(json.dumps(info))
    else:
        print(model.describe())
        for name, shape in info["tensors"].items():  # type: ignore[union-attr]
            print(f"  {name}  {tuple(shape)}")
        p = info["privacy"]
        print("privacy: none recorded (not trained under differential privacy by gossipfld)" if p is None else
              f"privacy: ({p['epsilon']:.4g}, {p['delta']:g})-DP for each row of the exporting node's data, "
              f"{p['steps']} steps of DP-SGD at noise multiplier {p['noise_multiplier']:.4g}, clip {p['clip']:g}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    model = Model.load(args.model)
    opt = OptimizerConfig(name=args.optimizer, lr=args.lr, momentum=args.momentum)
    trainer = Trainer(model, TrainConfig(optimizer=opt, batch_size=args.batch, seed=args.seed))
    data = load_directory(args.data, _data_spec(model, args.label_column))
    _note_skipped(data)
    table = data.all
    losses = []
    for epoch in range(1, args.epochs + 1):
        loss = trainer.epoch(table.x, table.y)
        losses.append(loss)
        if not np.isfinite(loss):
            raise GossipflError(f"training diverged at epoch {epoch} (loss {loss}); lower --lr")
        if not args.json:
            print(f"epoch {epoch}/{args.epochs}  loss {loss:.4f}")
    model.save(args.out)
    metrics = trainer.evaluate(table.x, table.y)
    if args.json:
        print(json.dumps({"epochs": args.epochs, "losses": losses, "train": metrics.as_dict(_classes(model)),
                          "skipped_rows": data.skipped_rows, "out": args.out}))
    else:
        print(f"train {_metrics_line(metrics)}; wrote {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    model = Model.load(args.model)
    if args.anomaly_label is not None:
        return evaluate_anomalies(args, model)
    refuse_misplaced_options(model, args)
    if args.rate is not None or args.threshold is not None:
        raise DataError("--rate and --threshold choose the threshold of --anomaly-label's precision and recall")
    trainer = Trainer(model)
    data = load_directory(args.data, _data_spec(model, args.label_column))
    table = data.all
    metrics = trainer.evaluate(table.x, table.y)
    _note_skipped(data)
    if args.json:
        print(json.dumps({**metrics.as_dict(_classes(model)), "skipped_rows": data.skipped_rows}))
    else:
        print(_metrics_line(metrics))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Offline with --model; otherwise through the running daemon's current model."""
    if args.model is None:
        task, out, _, classes = predict_via_daemon(args)
        if task == "anomaly":
            raise DataError("the daemon answers reconstructions, not anomaly scores: score with --model (a model "
                            "file, e.g. from gossipfl model export)")
    else:
        model = Model.load(args.model)
        classes = _classes(model)
        table = read_file(Path(args.input), _data_spec(model, args.label_column), require_labels=False)
        if len(table) == 0:
            raise DataError(f"{args.input}: no samples")
        if model.task == "anomaly":
            return predict_anomalies(args, model, table)
        refuse_misplaced_options(model, args)
        task, out = model.task, predict(model, table.x)
    if task == "classification":
        labels = predicted_classes(out)
        names = classes or [str(i) for i in range(max(out.shape[1], 2))]
        if args.json:
            probabilities = class_probabilities(out)
            print(json.dumps([
                {"class": names[lbl], "label": int(lbl), "scores": row.tolist(),
                 "probabilities": dict(zip(names, p.round(6).tolist(), strict=True))}
                for lbl, row, p in zip(labels, out, probabilities, strict=True)]))
        else:
            print("\n".join(names[lbl] for lbl in labels))
    elif args.json:
        print(json.dumps([{"value": row.tolist()} for row in out]))
    else:
        print("\n".join(" ".join(f"{v:.6g}" for v in row) for row in out))
    return 0


def cmd_certs_init_ca(args: argparse.Namespace) -> int:
    cert = init_ca(args.dir, args.name, days=args.days)
    node_id = format_node_id(node_id_from_cert_file(cert))
    print(f"wrote {Path(args.dir) / CA_KEY} (keep it secret) and {cert}; CA id {node_id}")
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    node_id = issue_node_cert(args.ca, args.name, args.out, days=args.days)
    print(format_node_id(node_id))
    return 0


def cmd_certs_show(args: argparse.Namespace) -> int:
    info = describe_certificate(args.file)
    if args.json:
        print(json.dumps(info))
    else:
        dns = ", ".join(info["dns_names"]) or "-"
        print(f"node id   {info['node_id']}\n"
              f"subject   {info['subject']}\n"
              f"issuer    {info['issuer']}\n"
              f"valid     {info['not_before']} to {info['not_after']} ({info['status']})\n"
              f"ca        {'yes' if info['is_ca'] else 'no'}\n"
              f"dns       {dns}\n"
              f"serial    {info['serial']}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """What gossipfld would refuse at start, said offline: keys, values, and the files they name."""
    config = load_config(args.file)
    check_named_files(config)
    ident = load_identity(config.tls.cert, config.tls.key, config.tls.ca)
    model = Model.load(config.model.path)
    Trainer(model)  # the model must be trainable
    # The data as the daemon will read it: a file the model's schema cannot read is refused here, before the
    # daemon starts and idles with "0 local samples" visible only in its log.
    data = LocalData(config.data.directory, DataSpec.of(model, config.data.label_column or None,
                                                        config.data.delimiter or None), validation_fraction=0.0)
    logging.getLogger("gossipfl.learning.data").setLevel(logging.ERROR)  # the refusal below says it once
    data.refresh()
    if data.skipped:
        why = next(iter(sorted(data.skipped.items())))[1]
        more = f" (and {len(data.skipped) - 1} more files)" if len(data.skipped) > 1 else ""
        raise DataError(f"data.directory: {why}{more}")
    if args.json:
        print(json.dumps({"ok": True, "config": str(args.file), "node_id": format_node_id(ident.node_id),
                          "model": {"path": str(config.model.path), "task": model.task,
                                    "parameters": model.num_params, "fingerprint": model.fingerprint_hex},
                          "data": data.report()}))
        return 0
    rows = f"{len(data.train)} rows" + (f", {sum(data.skipped_rows.values())} skipped {data.skipped_rows}"
                                         if data.skipped_rows else "")
    print(f"{args.file}: ok; node {format_node_id(ident.node_id)}, {model.describe()}; data {rows}")
    return 0


def _print_service_report(report: ServiceReport) -> None:
    for line in report.lines():
        print(line)
    for warning in report.warnings:
        print(f"gossipfl: warning: {warning}", file=sys.stderr)


def cmd_service_install(args: argparse.Namespace) -> int:
    """Unit, system user and default config; an edited config is kept and the shipped one lands beside it."""
    gossipfld = Path(args.gossipfld) if args.gossipfld else None
    report = install(Path(args.prefix), gossipfld)
    _print_service_report(report)
    if Path(args.prefix).resolve() == Path("/"):
        print(f"next: edit /{CONFIG_PATH} (see docs/systemd.md), then systemctl enable --now "
              f"{UNIT_NAME}")
    return 0


def cmd_service_uninstall(args: argparse.Namespace) -> int:
    """Unit and sysusers entry only: the config, the state and the user stay."""
    _print_service_report(uninstall(Path(args.prefix)))
    return 0


# ---------------------------------------------------------------- registration


def register_model(sub: Any, parser_class: type[argparse.ArgumentParser]) -> Any:
    """``gossipfl model init|info``; returns the ``model`` subcommands, where ``model export`` is added too."""
    model = sub.add_parser("model", help="create and inspect ONNX models")
    model_sub = model.add_subparsers(dest="model_command", required=True, parser_class=parser_class)
    init = model_sub.add_parser("init", help="write a new model from the zoo")
    init.add_argument("--arch", choices=ARCHITECTURES, required=True)
    init.add_argument("--data", help="a directory of CSV files: read the features, the classes and the scaling "
                                     "from it (docs/data.md)")
    init.add_argument("--label-column", help="with --data: the label column (default 'label')")
    init.add_argument("--features", type=name_list, help="with --data: the feature columns, in order")
    init.add_argument("--exclude", type=name_list, help="with --data: columns that are not features (a timestamp)")
    init.add_argument("--delimiter", choices=(",", ";", "\t"), help="with --data: default, detected")
    init.add_argument("--no-scaling", action="store_true", help="with --data: no standardisation step in the model")
    init.add_argument("--input-range", type=value_range, metavar="LO:HI",
                      help="scale every feature from its known range LO..HI to -1..1 instead of standardising "
                           "with the data's mean and spread: constants that read no row (use it under [privacy])")
    init.add_argument("--inputs", type=positive_int, help="features per sample (without --data)")
    init.add_argument("--classes", type=positive_int, help="classes (or outputs, for --task regression)")
    init.add_argument("--task", choices=("classification", "regression", "anomaly"),
                      help="default: anomaly for --arch autoencoder (no labels needed), else classification")
    init.add_argument("--hidden", type=int_list,
                      help="layer widths (mlp), channels (cnn1d), or widths around a bottleneck (autoencoder, "
                           "e.g. 16,2,16; default about 2F,F/3,2F for F features)")
    init.add_argument("--input-shape", type=int_list, help="channels,length for cnn1d")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", required=True)
    init.set_defaults(handler=cmd_model_init)
    info = model_sub.add_parser("info", help="describe a model file")
    info.add_argument("model")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=cmd_model_info)
    return model_sub


def register_train_eval(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """``gossipfl train`` and ``gossipfl eval``."""
    train = sub.add_parser("train", help="train a model on a local data directory")
    train.add_argument("--model", required=True)
    train.add_argument("--data", required=True)
    train.add_argument("--epochs", type=positive_int, required=True)
    train.add_argument("--batch", type=positive_int, default=32)
    train.add_argument("--lr", type=positive_float, default=0.05)
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    train.add_argument("--momentum", type=float, default=0.9)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--label-column", help="default: the model's schema, else 'label'")
    train.add_argument("--out", required=True)
    train.add_argument("--json", action="store_true")
    train.set_defaults(handler=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a model on a local data directory")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--label-column", help="default: the model's schema, else 'label'")
    ev.add_argument("--anomaly-label", help="anomaly models: rows whose label column holds this value are anomalies; "
                                           "reports roc_auc, and precision and recall at the threshold")
    add_threshold_options(ev)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(handler=cmd_eval)


def register_predict(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """``gossipfl predict``: offline with ``--model``, else through the running daemon."""
    pr = sub.add_parser("predict", help="run a model (--model, or the running daemon's) on a .csv or .npz file",
                        parents=[connection_options(parser_class)])
    pr.add_argument("--model", help="an ONNX model file; without it, ask the running daemon")
    pr.add_argument("--input", required=True)
    pr.add_argument("--label-column", help="default: the model's schema, else 'label'")
    add_threshold_options(pr)
    pr.add_argument("--json", action="store_true", help="anomaly models: keys score, anomaly, threshold")
    pr.set_defaults(handler=cmd_predict)


def register_admin(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """``gossipfl certs``, ``gossipfl config check`` and ``gossipfl service``."""
    certs = sub.add_parser("certs", help="the cluster CA and node certificates for mutual TLS")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, parser_class=parser_class)
    ca = certs_sub.add_parser("init-ca", help="create the cluster CA (ca.key, ca.crt) in a directory")
    ca.add_argument("--dir", required=True)
    ca.add_argument("--name", default="gossipfl cluster CA", help="the CA's common name")
    ca.add_argument("--days", type=positive_int, default=CA_DAYS)
    ca.set_defaults(handler=cmd_certs_init_ca)
    issue = certs_sub.add_parser("issue", help="make a node key and certificate; prints the node id")
    issue.add_argument("--ca", required=True, help="directory holding ca.key and ca.crt")
    issue.add_argument("--name", required=True, help="node name: 1-63 of A-Z a-z 0-9 . _ -")
    issue.add_argument("--out", required=True, help="directory for node.key, node.crt and ca.crt")
    issue.add_argument("--days", type=positive_int, default=NODE_DAYS)
    issue.set_defaults(handler=cmd_certs_issue)
    show = certs_sub.add_parser("show", help="node id, subject, issuer and validity of a certificate")
    show.add_argument("file")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_certs_show)
    config = sub.add_parser("config", help="check a node configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, parser_class=parser_class)
    check = config_sub.add_parser("check", help="check a TOML config and the files it names, offline")
    check.add_argument("file")
    check.add_argument("--json", action="store_true", help="the result as JSON (errors stay one line on stderr)")
    check.set_defaults(handler=cmd_config_check)
    svc = sub.add_parser("service", help="install or remove the systemd service")
    svc_sub = svc.add_subparsers(dest="service_command", required=True, parser_class=parser_class)
    svc_install = svc_sub.add_parser("install", help="write the unit, the sysusers entry and a default config")
    svc_install.add_argument("--prefix", default="/", help="root to install under, like DESTDIR (default /)")
    svc_install.add_argument("--gossipfld", help="the gossipfld executable (default: the one beside this gossipfl)")
    svc_install.set_defaults(handler=cmd_service_install)
    svc_uninstall = svc_sub.add_parser("uninstall", help="remove the unit and sysusers entry; keep config and state")
    svc_uninstall.add_argument("--prefix", default="/", help="root to remove from, like DESTDIR (default /)")
    svc_uninstall.set_defaults(handler=cmd_service_uninstall)
