"""Readers of the benchmarks' standard layouts on small temp files, their path / file errors, and the
embedded evaluation set."""
import json
import os

import pytest

from emu2_jax.evaluation import datasets as ds
from emu2_jax.evaluation import metrics, prompts


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in obj))
    else:
        path.write_text(json.dumps(obj))
    return str(path)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded by the readers")
    return str(path)


def _vqa_files(tmp_path, image_id=42):
    questions = _write(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"image_id": image_id, "question": "What color?", "question_id": 7}]})
    annotations = _write(tmp_path / "a.json", {"annotations": [
        {"question_id": 7, "image_id": image_id, "answers": [{"answer": "red", "answer_id": i} for i in range(10)]}]})
    return questions, annotations


def test_vqav2(tmp_path):
    image = _touch(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    questions, annotations = _vqa_files(tmp_path)
    (ex,) = ds.read("vqav2", annotations, images=str(tmp_path / "val2014"), questions=questions)
    assert ex == ds.Example("7", "What color?", image=image, answers=("red",) * 10)
    with pytest.raises(ValueError, match="--task=okvqa: needs --questions"):
        ds.read("okvqa", annotations, images=str(tmp_path / "val2014"))


def test_missing_image_is_named(tmp_path):
    questions, annotations = _vqa_files(tmp_path, image_id=43)
    (tmp_path / "val2014").mkdir()
    missing = os.path.join(str(tmp_path / "val2014"), "COCO_val2014_000000000043.jpg")
    with pytest.raises(ValueError, match=f"annotation 0: {missing} not found"):
        ds.read("vqav2", annotations, images=str(tmp_path / "val2014"), questions=questions)


@pytest.mark.parametrize("name", ["../outside.jpg", "sub/../../outside.jpg", "/etc/hostname", ""])
def test_paths_must_stay_inside_images(tmp_path, name):
    _touch(tmp_path / "outside.jpg")
    data = _write(tmp_path / "data" / "vizwiz.json", [{"image": name, "question": "q", "answers": [{"answer": "a"}]}])
    with pytest.raises(ValueError, match="entry 0: .* is not inside --images="):
        ds.read("vizwiz", data)


def test_vizwiz_textvqa_gqa(tmp_path):
    image = _touch(tmp_path / "img1.jpg")
    vizwiz = _write(tmp_path / "v.json", [{"image": "img1.jpg", "question": "What is this?",
                                           "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10}])
    assert ds.read("vizwiz", vizwiz) == [ds.Example("img1.jpg", "What is this?", image=image,
                                                    answers=("unanswerable",) * 10)]
    textvqa = _write(tmp_path / "t.json", {"data": [{"question_id": 3, "question": "what brand?",
                                                     "image_id": "img1", "answers": ["nokia"] * 10}]})
    assert ds.read("textvqa", textvqa) == [ds.Example("3", "what brand?", image=image, answers=("nokia",) * 10)]
    gqa = _write(tmp_path / "g.json", {"201": {"imageId": "img1", "question": "Is it red?", "answer": "no"}})
    assert ds.read("gqa", gqa) == [ds.Example("201", "Is it red?", image=image, answers=("no",))]


def test_video_qa_by_name_and_by_id(tmp_path):
    gif = _touch(tmp_path / "videos" / "clip.gif")
    folder = os.path.dirname(_touch(tmp_path / "videos" / "video7010" / "frame_00.jpg"))
    msvd = _write(tmp_path / "msvd.json", [{"video": "clip.gif", "question": "what is it?", "answer": "dog", "id": 5}])
    assert ds.read("msvd_qa", msvd, images=str(tmp_path / "videos")) == [
        ds.Example("5", "what is it?", video=gif, answers=("dog",))]
    msrvtt = _write(tmp_path / "msrvtt.json", [{"video_id": 7010, "question": "who sings?", "answer": "man", "id": 0}])
    assert ds.read("msrvtt_qa", msrvtt, images=str(tmp_path / "videos"))[0].video == folder
    mp4 = _touch(tmp_path / "videos" / "video7011.mp4")  # MSRVTT's own file names
    by_file = _write(tmp_path / "mp4.json", [{"video_id": 7011, "question": "who?", "answer": "man"}])
    assert ds.read("msrvtt_qa", by_file, images=str(tmp_path / "videos"))[0].video == mp4
    lost = _write(tmp_path / "lost.json", [{"video_id": 9, "question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="none of video9, video9.mp4, video9.avi, video9.gif, vid9, .* in --images="):
        ds.read("msrvtt_qa", lost, images=str(tmp_path / "videos"))


def test_hateful_memes_default_images_dir_is_the_data_folder(tmp_path):
    image = _touch(tmp_path / "img" / "01235.png")
    data = _write(tmp_path / "dev_seen.jsonl", [{"id": 1235, "img": "img/01235.png", "label": 1, "text": "hi"}])
    assert ds.read("hateful_memes", data) == [ds.Example("1235", "hi", image=image, label=1)]
    bad = _write(tmp_path / "bad.jsonl", [{"id": 1, "img": "img/01235.png", "label": 2, "text": "hi"}])
    with pytest.raises(ValueError, match="line 1: label 2 is not 0 or 1"):
        ds.read("hateful_memes", bad)


def test_coco_karpathy_split(tmp_path):
    image = _touch(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    _touch(tmp_path / "train2014" / "COCO_train2014_000000000002.jpg")
    data = _write(tmp_path / "dataset_coco.json", {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "split": "test", "cocoid": 1,
         "sentences": [{"raw": "A cat."}, {"raw": "A kitten."}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000002.jpg", "split": "train", "cocoid": 2,
         "sentences": [{"raw": "A dog."}]}]})
    assert ds.read("coco_caption", data) == [ds.Example("1", image=image, answers=("A cat.", "A kitten."))]
    assert [e.key for e in ds.read("coco_caption", data, split="train")] == ["2"]
    with pytest.raises(ValueError, match="no coco_caption examples in split 'val'"):
        ds.read("coco_caption", data, split="val")


def test_image_gen(tmp_path):
    image = _touch(tmp_path / "refs" / "a.jpg")
    data = _write(tmp_path / "gen.jsonl", [{"prompt": "a red bus", "image": "refs/a.jpg"}])
    assert ds.read("image_gen", data) == [ds.Example("0", "a red bus", image=image)]


def test_format_errors_are_one_line_and_named(tmp_path):
    _touch(tmp_path / "a.jpg")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=f"--data={broken}: not valid JSON"):
        ds.read("gqa", str(broken))
    with pytest.raises(ValueError, match="cannot read"):
        ds.read("gqa", str(tmp_path / "absent.json"))
    no_question = _write(tmp_path / "g.json", {"9": {"imageId": "a", "answer": "no"}})
    with pytest.raises(ValueError, match="question 9: lacks 'question'"):
        ds.read("gqa", no_question)
    twice = _write(tmp_path / "v.json", [{"image": "a.jpg", "question": "q", "answers": []}] * 2)
    with pytest.raises(ValueError, match="key 'a.jpg' appears 2 times"):
        ds.read("vizwiz", twice)
    with pytest.raises(ValueError, match="--task=nope: not one of vqav2"):
        ds.read("nope", twice)


EMBEDDED_SIZES = {"vqav2": 8, "okvqa": 6, "vizwiz": 6, "textvqa": 4, "gqa": 6, "msvd_qa": 4, "msrvtt_qa": 3,
                  "hateful_memes": 8, "coco_caption": 6, "image_gen": 6}


@pytest.mark.parametrize("task", list(ds.TASK_METRIC))
def test_embedded_eval_set_loads(task):
    paths = ds.embedded_eval_data(task)
    assert all(os.path.exists(p) for p in paths.values())
    examples = ds.read(task, **paths)
    assert len(examples) == EMBEDDED_SIZES[task]
    assert all(os.path.exists(e.video if task in ds.VIDEO_TASKS else e.image) for e in examples)
    if ds.TASK_METRIC[task] == "vqa_accuracy":  # 10 answers, the most common one agreed by at least 3
        assert all(len(e.answers) == 10 for e in examples)
        assert all(metrics.vqa_accuracy(prompts.shot_answer(e.answers), e.answers) == 1.0 for e in examples)
    if task == "hateful_memes":
        assert sorted(e.label for e in examples) == [0] * 4 + [1] * 4
    if task == "coco_caption":
        assert all(len(e.answers) == 5 for e in examples)
