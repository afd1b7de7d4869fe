"""stepback-ray: personalize LLM output for many users as an offline Ray batch job.

The package reads top-down like the pipeline: ``data`` -> ``profiling`` -> ``prompting`` / ``retrieval`` ->
``engines`` -> ``metrics`` -> ``storage``, tied together by ``pipeline`` and driven by ``cli``.
"""

__version__ = "0.1.0"
