import pytest

from caitool.errors import CaitoolError
from caitool.records import GenerationRecord, Message, parse_prompt_input, parse_record, stable_id


def test_string_prompt_becomes_one_user_turn_and_keeps_user_fields():
    record = parse_prompt_input({"id": 7, "prompt": "Hello", "category": "greeting", "meta": {"a": [1]}})
    assert record.id == "7"
    assert record.prompt == [Message(role="user", content="Hello")]
    assert record.user_fields() == {"category": "greeting", "meta": {"a": [1]}}


def test_messages_keep_every_turn_and_a_final_assistant_turn_is_the_response():
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."},
    ]
    record = parse_prompt_input({"messages": turns})
    assert [m.content for m in record.prompt] == ["Be brief.", "Hi", "Hello", "Bye?"]
    assert record.response == "Bye."


def test_id_defaults_to_a_stable_hash_of_the_prompt():
    a = parse_prompt_input({"prompt": "same text"})
    b = parse_prompt_input({"prompt": [{"role": "user", "content": "same text"}]})
    assert a.id == b.id == stable_id(a.prompt)
    assert a.id != parse_prompt_input({"prompt": "other text"}).id


def test_generation_record_is_accepted_as_a_prompt_with_its_response():
    generated = GenerationRecord(
        id="g1",
        prompt=[Message(role="user", content="Q")],
        completion=[Message(role="assistant", content="A1")],
        responses=["A1", "A2"],
        finished=[True, True],
        model="m@0",
        seed=3,
        category="x",
    )
    record = parse_prompt_input(generated.model_dump())
    assert record.response == "A1"
    assert record.user_fields() == {"category": "x"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"text": "hi"}, 'missing field "prompt"'),
        ({"prompt": 3}, 'field "prompt" must be a string or a list of messages, got int'),
        ({"prompt": [{"role": "robot", "content": "x"}]}, 'field "prompt"'),
        ({"prompt": ""}, "empty string"),
        ({"prompt": "x", "id": [1]}, 'field "id" must be a string or an integer'),
        ({"messages": [{"role": "assistant", "content": "only me"}]}, "must end with a user turn"),
        ({"messages": "hi"}, 'field "messages" must be a list of turns ({"role": ..., "content": ...})'),
        ({"messages": {"role": "user", "content": "hi"}}, 'field "messages" must be a list of turns'),
        ({"kind": "preference", "prompt": "x"}, '"preference" record cannot be used here'),
    ],
)
def test_bad_prompt_records_give_one_clear_message(raw, message):
    with pytest.raises(CaitoolError) as caught:
        parse_prompt_input(raw)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_parse_record_reports_the_missing_field_by_name():
    with pytest.raises(CaitoolError, match='missing field "responses"'):
        parse_record(
            GenerationRecord,
            {"id": "x", "prompt": [], "completion": [], "finished": [], "model": "m", "seed": 0},
        )
    with pytest.raises(CaitoolError, match='expected a "generation" record, got a "revision" record'):
        parse_record(GenerationRecord, {"kind": "revision"})
