"""TF Serving's ``BatchingParameters`` and ``MonitoringConfig`` protos, for the files its flags name.

``--batching_parameters_file`` and ``--monitoring_config_file`` hold text-format protos that the
``tensorflow-serving-api`` package does not ship (they live in TF Serving's servables and config
trees). They are declared here with TF Serving's field names and numbers, in a private descriptor
pool so they can never clash with a future release of that package, and parsed the way TF Serving
parses them: an unknown field or a bad value is an error naming the file.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)

_F = descriptor_pb2.FieldDescriptorProto


def _field(name: str, number: int, kind: int, type_name: str = "", repeated: bool = False) -> _F:
    label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    proto = _F(name=name, number=number, type=kind, label=label)
    if type_name:
        proto.type_name = type_name
    return proto


def _declare() -> None:
    file = descriptor_pb2.FileDescriptorProto(
        name="maas/tensorflow_serving_file_configs.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    int64, string, boolean = ".google.protobuf.Int64Value", ".google.protobuf.StringValue", ".google.protobuf.BoolValue"
    message = _F.TYPE_MESSAGE
    batching = file.message_type.add(name="BatchingParameters")
    batching.field.extend(
        [
            _field("max_batch_size", 1, message, int64),
            _field("batch_timeout_micros", 2, message, int64),
            _field("max_enqueued_batches", 3, message, int64),
            _field("num_batch_threads", 4, message, int64),
            _field("thread_pool_name", 5, message, string),
            _field("allowed_batch_sizes", 6, _F.TYPE_INT64, repeated=True),
            _field("pad_variable_length_inputs", 7, _F.TYPE_BOOL),
            _field("enable_large_batch_splitting", 8, message, boolean),
            _field("max_execution_batch_size", 9, message, int64),
        ]
    )
    prometheus = file.message_type.add(name="PrometheusConfig")
    prometheus.field.extend([_field("enable", 1, _F.TYPE_BOOL), _field("path", 2, _F.TYPE_STRING)])
    monitoring = file.message_type.add(name="MonitoringConfig")
    monitoring.field.append(_field("prometheus_config", 1, message, ".tensorflow.serving.PrometheusConfig"))
    _POOL.Add(file)


_declare()
BatchingParameters = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))
MonitoringConfig = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))


class ConfigFileError(ValueError):
    """A flag's config file cannot be read or parsed."""


def read_text_proto(path: Path, message_class: type, flag: str):
    """Parse the text-format file ``path`` (given by ``--<flag>``) as ``message_class``.

    Raises:
        ConfigFileError: the file is missing, unreadable or not a valid text-format message.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"--{flag}: cannot read {path}: {exc}") from None
    message = message_class()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigFileError(
            f"--{flag}: Error parsing text-format {message.DESCRIPTOR.full_name} in {path}: {exc}"
        ) from None
    return message
