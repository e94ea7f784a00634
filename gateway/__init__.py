"""A multi-stream gateway for OpenAI-compatible chat APIs.

The data path, in the order a request crosses it:

    app (middlewares) -> handlers -> routing -> upstream (pools, failover) -> relay
                                                        accounting (parsed copy) <-'

`python -m gateway` is a thin entry point over this library; tests import it directly.
"""

__version__ = "0.1.0"
