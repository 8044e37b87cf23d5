"""Fault injection for the live-server tests, loaded by Python at start-up via PYTHONPATH.

- TTS_TEST_FAULT_MARK: building the talker prompt of a request whose text holds that mark raises, as a
  crash inside generation would; every other request runs the real engine.
- TTS_TEST_LOAD_DELAY_S: loading the model first waits that long, as a large checkpoint would, so that
  tests can probe and stop a server while it loads.

Nothing in the product reads these variables.
"""

import importlib.abc
import importlib.util
import os
import sys
import time

MARK = os.environ.get("TTS_TEST_FAULT_MARK")
LOAD_DELAY_S = float(os.environ.get("TTS_TEST_LOAD_DELAY_S") or 0)


def patch_prompt(module):
    real = module.PromptBuilder.build

    def build(self, text, *args, **kwargs):
        if MARK in text:
            raise RuntimeError("injected generation fault")
        return real(self, text, *args, **kwargs)

    module.PromptBuilder.build = build


def patch_load(module):
    real = module.TTSEngine.load.__func__

    def load(cls, settings, *args, **kwargs):
        time.sleep(LOAD_DELAY_S)
        return real(cls, settings, *args, **kwargs)

    module.TTSEngine.load = classmethod(load)


class _Patch(importlib.abc.MetaPathFinder):
    def __init__(self, patches):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        patch = self.patches.pop(name)
        if not self.patches:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # finds the real module: this finder no longer matches it
        exec_module = spec.loader.exec_module

        def patched_exec(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = patched_exec
        return spec


_patches = {}
if MARK:
    _patches["tts_service.prompt"] = patch_prompt
if LOAD_DELAY_S:
    _patches["tts_service.engine"] = patch_load
if _patches:
    sys.meta_path.insert(0, _Patch(_patches))
