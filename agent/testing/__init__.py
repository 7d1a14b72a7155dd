"""Real local servers and model makers for tests, the demo and benchmarks (like ``trio.testing``).

- ``faults``      fault rules both servers obey (status codes, slow, reset, corrupt, ignore Range)
- ``http``        a threaded WSGI server on 127.0.0.1:0 with start/close
- ``oss_server``  an OSS-compatible server: moto's S3 backend with OSS's differences bridged
- ``hub_server``  a ModelScope-compatible hub serving the endpoints the modelscope SDK calls
- ``models``      deterministic generated model directories
"""
