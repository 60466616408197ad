"""The Open Inference Protocol's Protobuf messages (``inference`` package), generated.

``open_inference_grpc.proto`` is the protocol's own file (kserve/open-inference-protocol,
Apache-2.0; the same messages as KServe's ``grpc_predict_v2.proto``). ``*_pb2.py`` is generated
from it by grpcio-tools 1.85.1 (pinned in the ``dev`` extra): ``make proto``. Never edit it by
hand; ``tests/test_v2.py`` checks that it is what the pinned generator makes.
"""

from worker.oip import open_inference_grpc_pb2 as pb

__all__ = ["pb"]
