"""The zoo's one error family: every error the zoo raises on purpose is a ``ZooError``.

Each subclass also keeps its built-in base (``ValueError``, ``LookupError``, ``RuntimeError``), so
``except ValueError`` in user code keeps working. The CLI maps the whole family to exit code 2 in one
place (``zoo.cli.bad_input_exits``). The subclasses live with the code that raises them:

==========================  ==========================  ================
class                       where                       built-in base
==========================  ==========================  ================
``ConfigSourceError``       ``zoo.config_source``       ``ValueError``
``TokenError``              ``zoo.checks``              ``ValueError``
``ShardingError``           ``zoo.sharding``            ``ValueError``
``CheckpointError``         ``zoo.checkpoint``          ``RuntimeError``
``ExportError``             ``zoo.export.entries``      ``ValueError``
``ConvertError``            ``zoo.convert.torch``       ``ValueError``
``TokenizerError``          ``zoo.tokenizers``          ``ValueError``
``DataError``               ``zoo.train.data``          ``ValueError``
``GenerationError``         ``zoo.inference.sampling``  ``ValueError``
``PluginError``             ``zoo.registry``            ``Exception``
``UnknownPluginError``      ``zoo.registry``            ``LookupError``
``ContractError``           ``zoo.registry.contracts``  ``ValueError``
``CellError``               ``zoo.nn.cell``             ``RuntimeError``
``KernelError``             ``zoo.kernels.int8``        ``ValueError``
``QuantizationError``       ``zoo.quantization``        ``ValueError``
``TrainError``              ``zoo.train.loop``          ``ValueError``
``EngineError``             ``zoo.inference.engine``    ``RuntimeError``
``ServeError``              ``zoo.serve.server``        ``ValueError``
``ApiError``                ``zoo.serve.protocol``      ``ValueError``
==========================  ==========================  ================
"""

from __future__ import annotations


class ZooError(Exception):
    """Base of every error the zoo raises on purpose: bad input, unreadable files, refused requests."""
