"""The optserve v1 wire API, generated from protos/optserve/v1/*.proto (regenerate with
``python scripts/gen_protos.py``; never edit the ``*_pb2*`` files by hand)."""
