"""Fault injection for tests/test_reliability.py, loaded by Python at start-up via PYTHONPATH.

When TTS_TEST_FAULT_MARK is set, TTSEngine.synthesize raises for any batch holding a text with that
mark, as a crash inside generation would; every other batch runs the real engine. Nothing in the
product reads this variable.
"""

import importlib.abc
import importlib.util
import os
import sys

MARK = os.environ.get("TTS_TEST_FAULT_MARK")


class _PatchEngine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "tts_service.engine":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def patched_exec(module):
            exec_module(module)
            real = module.TTSEngine.synthesize

            def synthesize(self, requests):
                if any(MARK in request.text for request in requests):
                    raise RuntimeError(f"injected generation fault for a batch of {len(requests)}")
                return real(self, requests)

            module.TTSEngine.synthesize = synthesize

        spec.loader.exec_module = patched_exec
        return spec


if MARK:
    sys.meta_path.insert(0, _PatchEngine())
