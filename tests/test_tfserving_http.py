"""TF-Serving-style REST routes."""

from __future__ import annotations


def test_predict_instances_objects_and_strings(http) -> None:
    a = http.post("/v1/models/tiny-llama:predict", json={"instances": [{"text": "Hello"}, {"text": "world"}]})
    b = http.post("/v1/models/tiny-llama:predict", json={"instances": ["Hello", "world"]})
    assert a.status_code == 200 and b.status_code == 200
    preds = a.json()["predictions"]
    assert len(preds) == 2
    assert preds == b.json()["predictions"]  # predict is greedy by default: same text
    assert all(p["completion_tokens"] == 16 and p["prompt_tokens"] > 0 for p in preds)
    assert all(p["finish_reason"] == "length" for p in preds)


def test_predict_inputs_columnar_and_parameters(http) -> None:
    res = http.post(
        "/v1/models/tiny-llama:predict",
        content=b'{"inputs": {"text": ["Hello"]}, "parameters": {"max_tokens": 3}}',
        headers={},  # no content-type, as many TF-Serving clients send
    )
    assert res.status_code == 200, res.text
    outputs = res.json()["outputs"]
    assert outputs[0]["completion_tokens"] == 3
    versioned = http.post("/v1/models/tiny-llama/versions/1:predict", json={"inputs": "Hello", "parameters": {"max_tokens": 3}})
    assert versioned.json()["outputs"][0]["text"] == outputs[0]["text"]


def test_predict_matches_openai_greedy(http) -> None:
    tf = http.post("/v1/models/tiny-llama:predict", json={"instances": ["Hello"], "parameters": {"max_tokens": 6}}).json()
    oa = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 6, "temperature": 0}).json()
    assert tf["predictions"][0]["text"] == oa["choices"][0]["text"]


def test_model_status_and_metadata(http) -> None:
    status = http.get("/v1/models/tiny-llama").json()
    assert status["model_version_status"] == [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]
    assert http.get("/v1/models/tiny-llama/versions/1").json()["model_version_status"][0]["state"] == "AVAILABLE"
    meta = http.get("/v1/models/tiny-llama/metadata").json()
    assert meta["model_spec"] == {"name": "tiny-llama", "signature_name": "", "version": "1"}
    assert "serving_default" in meta["metadata"]["signature_def"]["signature_def"]


def test_unknown_model_version_and_label_are_404_tf_shape(http) -> None:
    for method, path, body in [
        ("POST", "/v1/models/nope:predict", {"instances": ["x"]}),
        ("GET", "/v1/models/nope", None),
        ("GET", "/v1/models/nope/metadata", None),
        ("GET", "/v1/models/tiny-llama/versions/7", None),
        ("POST", "/v1/models/tiny-llama/versions/7:predict", {"instances": ["x"]}),
        ("POST", "/v1/models/tiny-llama/labels/canary:predict", {"instances": ["x"]}),
    ]:
        res = http.request(method, path, json=body)
        assert res.status_code == 404, (path, res.text)
        assert isinstance(res.json()["error"], str) and res.json()["error"]


def test_predict_bad_input_is_400_tf_shape(http) -> None:
    for body in [
        {},
        {"instances": []},
        {"instances": [{"txt": "x"}]},
        {"instances": [""]},
        {"instances": ["x"], "inputs": ["y"]},
        {"instances": ["x"], "parameters": {"max_tokens": 0}},
        {"instances": ["x"], "parameters": {"temprature": 0.5}},
    ]:
        res = http.post("/v1/models/tiny-llama:predict", json=body)
        assert res.status_code == 400, (body, res.text)
        assert isinstance(res.json()["error"], str)
