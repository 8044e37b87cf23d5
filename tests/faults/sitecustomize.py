"""Fault injection for tests/test_reliability.py, loaded by Python at start-up via PYTHONPATH.

When TTS_TEST_FAULT_MARK is set, building the talker prompt of a request whose text holds that mark
raises, as a crash inside generation would; every other request runs the real engine. Nothing in the
product reads this variable.
"""

import importlib.abc
import importlib.util
import os
import sys

MARK = os.environ.get("TTS_TEST_FAULT_MARK")


class _PatchPrompt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "tts_service.prompt":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def patched_exec(module):
            exec_module(module)
            real = module.PromptBuilder.build

            def build(self, text, *args, **kwargs):
                if MARK in text:
                    raise RuntimeError("injected generation fault")
                return real(self, text, *args, **kwargs)

            module.PromptBuilder.build = build

        spec.loader.exec_module = patched_exec
        return spec


if MARK:
    sys.meta_path.insert(0, _PatchPrompt())
