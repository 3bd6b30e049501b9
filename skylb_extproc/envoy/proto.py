"""The one module that imports Envoy's generated protobuf classes (the `xds-protos` package).

Everything else imports the names from here, so a switch of message library (or of Envoy API
version) touches one file. Only `*_pb2` modules are imported: the `*_pb2_grpc` stubs import grpc,
which the sans-I/O core must not; the gRPC driver imports the servicer stub itself.

The classes are untyped for mypy (protobuf ships no stubs here): annotations using them are `Any`.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as _ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

# Envoy -> server
ProcessingRequest = _ep.ProcessingRequest
HttpHeaders = _ep.HttpHeaders
HttpBody = _ep.HttpBody
HttpTrailers = _ep.HttpTrailers
ProtocolConfiguration = _ep.ProtocolConfiguration

# server -> Envoy
ProcessingResponse = _ep.ProcessingResponse
HeadersResponse = _ep.HeadersResponse
BodyResponse = _ep.BodyResponse
TrailersResponse = _ep.TrailersResponse
CommonResponse = _ep.CommonResponse
HeaderMutation = _ep.HeaderMutation
BodyMutation = _ep.BodyMutation
StreamedBodyResponse = _ep.StreamedBodyResponse
ImmediateResponse = _ep.ImmediateResponse
CONTINUE_AND_REPLACE = _ep.CommonResponse.CONTINUE_AND_REPLACE

# shared building blocks
HeaderMap = base_pb2.HeaderMap
HeaderValue = base_pb2.HeaderValue
HeaderValueOption = base_pb2.HeaderValueOption
OVERWRITE_IF_EXISTS_OR_ADD = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
HttpStatus = http_status_pb2.HttpStatus
Struct = struct_pb2.Struct

# ProcessingMode.BodySendMode numbers, as Envoy reports them in ProtocolConfiguration
ProcessingMode = processing_mode_pb2.ProcessingMode

__all__ = [
    "CONTINUE_AND_REPLACE",
    "OVERWRITE_IF_EXISTS_OR_ADD",
    "BodyMutation",
    "BodyResponse",
    "CommonResponse",
    "HeaderMap",
    "HeaderMutation",
    "HeaderValue",
    "HeaderValueOption",
    "HeadersResponse",
    "HttpBody",
    "HttpHeaders",
    "HttpStatus",
    "HttpTrailers",
    "ImmediateResponse",
    "ProcessingMode",
    "ProcessingRequest",
    "ProcessingResponse",
    "ProtocolConfiguration",
    "StreamedBodyResponse",
    "Struct",
    "TrailersResponse",
]
