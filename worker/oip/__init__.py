"""The Open Inference Protocol's Protobuf messages (``inference`` package), generated.

``open_inference_grpc.proto`` is the protocol's own file (kserve/open-inference-protocol,
Apache-2.0; the same messages and service as KServe's ``grpc_predict_v2.proto``).
``*_pb2.py`` (messages) and ``*_pb2_grpc.py`` (the service) are generated from it by
grpcio-tools 1.81.1 (pinned in the ``dev`` extra): ``make proto``. Never edit them by hand;
``tests/test_formats.py`` checks that they are what the pinned generator makes.
"""

from worker.oip import open_inference_grpc_pb2 as pb
from worker.oip import open_inference_grpc_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
