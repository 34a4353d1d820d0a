"""Chat templates in the shapes real checkpoints ship them, tool turns included, for the shaped
checkpoints of parallel/checkpoints/shaped_models.py.

Each is written here in its family's format rather than copied: the same special tokens, the same
places for the system prompt, the offered tools, the assistant's calls and the tools' results, so
that rendering and tool-call parsing are exercised the way those checkpoints exercise them.
Jinja whitespace control (`{%-`, `{{-`) keeps the source readable; only `{{ }}` emits text.
"""

from __future__ import annotations

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""Llama 3.0 Instruct: no tools."""

# Llama 3.1 / 3.2 Instruct: a dated system header ("Environment: ipython" when tools are
# offered), the tools as JSON in the first user turn, calls as bare {"name", "parameters"} JSON,
# results in an `ipython` turn.
LLAMA32_TEMPLATE = r"""
{{- bos_token }}
{%- if messages[0].role == 'system' %}
  {%- set system_message = messages[0].content | trim %}{%- set messages = messages[1:] %}
{%- else %}
  {%- set system_message = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{%- if tools %}{{- 'Environment: ipython\n' }}{%- endif %}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + (date_string if date_string is defined else '26 Jul 2024') }}
{{- '\n\n' + system_message + '<|eot_id|>' }}
{%- if tools and messages %}
  {%- set first = messages[0].content | trim %}{%- set messages = messages[1:] %}
  {{- '<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a'
      ' function call with its proper arguments that best answers the given prompt.\n\nRespond in the format'
      ' {"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.\n\n' }}
  {%- for tool in tools %}{{- tool | tojson(indent=4) + '\n\n' }}{%- endfor %}
  {{- first + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
  {%- if message.role == 'assistant' and message.tool_calls %}
    {%- for call in message.tool_calls %}
      {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
      {{- {'name': call.function.name, 'parameters': call.function.arguments} | tojson }}{{- '<|eot_id|>' }}
    {%- endfor %}
  {%- elif message.role == 'tool' or message.role == 'ipython' %}
    {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + {'output': message.content} | tojson + '<|eot_id|>' }}
  {%- else %}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + (message.content or '') | trim + '<|eot_id|>' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Qwen2.5 Instruct (ChatML): tools as one JSON line each inside <tools></tools> in the system
# turn, calls as <tool_call>{"name", "arguments"}</tool_call>, results as <tool_response> inside
# a user turn (consecutive results share one).
QWEN25_TEMPLATE = r"""
{%- set default_system = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' %}
{%- set system = messages[0].content if messages[0].role == 'system' else default_system %}
{{- '<|im_start|>system\n' + system }}
{%- if tools %}
  {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
      'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
  {%- for tool in tools %}{{- '\n' + tool | tojson }}{%- endfor %}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within'
      ' <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
      '\n</tool_call>' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for message in messages %}
  {%- if message.role == 'system' and loop.first %}
  {%- elif message.role == 'assistant' and message.tool_calls %}
    {{- '<|im_start|>assistant' + ('\n' + message.content if message.content else '') }}
    {%- for call in message.tool_calls %}
      {{- '\n<tool_call>\n' + {'name': call.function.name, 'arguments': call.function.arguments} | tojson + '\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\n' }}
  {%- elif message.role == 'tool' %}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
    {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
  {%- else %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

QWEN3_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Mistral 7B Instruct v0.3: [INST] turns (the system prompt joins the last user turn), the tools
# in [AVAILABLE_TOOLS] before the last user turn, calls as a [TOOL_CALLS] JSON array carrying
# the call's id's last nine characters, results as [TOOL_RESULTS] with that id.
MISTRAL_V3_TEMPLATE = r"""
{%- if messages[0].role == 'system' %}
  {%- set system_message = messages[0].content %}{%- set loop_messages = messages[1:] %}
{%- else %}
  {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}
{{- bos_token }}
{%- for message in loop_messages %}
  {%- if message.role == 'user' %}
    {%- if tools and message == user_messages[-1] %}
      {{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}
    {%- endif %}
    {%- if message == user_messages[-1] and system_message is defined %}
      {{- '[INST] ' + system_message + '\n\n' + message.content + '[/INST]' }}
    {%- else %}
      {{- '[INST] ' + message.content + '[/INST]' }}
    {%- endif %}
  {%- elif message.role == 'assistant' and message.tool_calls %}
    {{- '[TOOL_CALLS] [' }}
    {%- for call in message.tool_calls %}
      {%- if not call.id or call.id | length < 9 %}
        {{- raise_exception('Tool call ids must be at least 9 characters long') }}
      {%- endif %}
      {{- {'name': call.function.name, 'arguments': call.function.arguments, 'id': call.id[-9:]} | tojson }}
      {{- ', ' if not loop.last else ']' }}
    {%- endfor %}
    {{- eos_token }}
  {%- elif message.role == 'assistant' %}
    {{- ' ' + message.content + eos_token }}
  {%- elif message.role == 'tool' %}
    {%- if not message.tool_call_id or message.tool_call_id | length < 9 %}
      {{- raise_exception('Tool results must name the call they answer (tool_call_id, at least 9 characters)') }}
    {%- endif %}
    {{- '[TOOL_RESULTS] ' + {'content': message.content, 'call_id': message.tool_call_id[-9:]} | tojson }}
    {{- '[/TOOL_RESULTS]' }}
  {%- else %}
    {{- raise_exception('Only user, assistant and tool roles are supported, after an optional system message') }}
  {%- endif %}
{%- endfor %}
"""

GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
