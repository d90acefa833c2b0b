"""Generated stubs for tokenwire.v1 (scripts/generate_stubs.sh); do not edit the *_pb2* files."""
