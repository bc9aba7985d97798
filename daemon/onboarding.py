"""`devtune continue-config DEVELOPER`: the Continue config.yaml that points one developer's editor at devtune.

Two blocks, both carrying the developer's own devtune token (`${{ secrets.DEVTUNE_TOKEN }}`, read by Continue
from ~/.continue/.env):
- the autocomplete model: the gateway's stable model name over Continue's `openai` provider. For a model
  without native FIM support Continue renders the prompt itself and POSTs it to `<apiBase>completions`
  (core/autocomplete/generation/CompletionStreamer.ts -> streamComplete(prompt, {raw: true}); OpenAI.ts
  -> _legacystreamComplete). It picks that template from the model name unless `promptTemplates.autocomplete`
  sets one (core/autocomplete/CompletionProvider.ts; templating/index.ts renders it with Handlebars), and
  "devtune" names no family, so the template is handed out here: the base family's own FIM layout, the one
  the adapters were trained on (pipelines/tokens.py). `apiBase` ends with "/": Continue joins it with
  `new URL("completions", apiBase)`.
- the `data:` destination: Continue's events POSTed to the service (`[continue_http]`), the signal that
  trains the next adapters.
"""

from __future__ import annotations

import json

from pipelines.config import Config
from pipelines.tokens import FimTokens

EVENTS = ("autocomplete", "editOutcome", "nextEditOutcome", "chatFeedback", "chatInteraction", "editInteraction",
          "toolUsage")
TOKEN = "${{ secrets.DEVTUNE_TOKEN }}"


def autocomplete_template(fim: FimTokens) -> str:
    """The base family's prefix-suffix-middle prompt as a Continue (Handlebars) template."""
    return fim.psm("{{{prefix}}}", "{{{suffix}}}")


def continue_yaml(cfg: Config, developer: str, fim: FimTokens, gateway_url: str, api_url: str,
                  notes: list[str]) -> str:
    """A complete config.yaml (usable as it is, or merged into an existing one), with `notes` as comments."""
    lines = [f"# Continue config for {developer}, from devtune ({cfg.path}).",
             "# Use it as ~/.continue/config.yaml, or add its models: and data: entries to yours. Continue reads the",
             f"# token from ~/.continue/.env: DEVTUNE_TOKEN=<the token `devtune token issue {developer}` printed>.",
             *[f"# {n}" for n in notes],
             "name: devtune",
             "version: 0.0.1",
             "schema: v1",
             "models:",
             f"  - name: {json.dumps(cfg.serve.model_name)}",
             "    provider: openai",
             f"    model: {json.dumps(cfg.serve.model_name)}",
             f"    apiBase: {json.dumps(gateway_url.rstrip('/') + '/v1/')}",
             f"    apiKey: {TOKEN}",
             "    roles:",
             "      - autocomplete",
             "    useLegacyCompletionsEndpoint: true",
             "    promptTemplates:",
             f"      autocomplete: {json.dumps(autocomplete_template(fim), ensure_ascii=False)}",
             "data:",
             "  - name: devtune",
             f"    destination: {json.dumps(api_url.rstrip('/') + '/continue/devdata')}",
             "    schema: 0.2.0",
             "    level: all",
             f"    events: [{', '.join(EVENTS)}]",
             f"    apiKey: {TOKEN}"]
    return "\n".join(lines) + "\n"
