"""The training DAG in the Airflow web UI, in headless Chromium, as a new user meets it.

Against Airflow on the local stack (see ``tests/fixtures/browser.py``): the trigger form
works with its defaults and refuses bad values, a run triggered from it succeeds, unpausing starts no
missed run, and the task logs of runs started from the UI and from ``maas run`` show training progress
and the metrics. The tests share one stack and run in file order.
"""

from __future__ import annotations

import re
import urllib.parse

import pytest

from tests.fixtures.browser import save_screenshot

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DAG_ID = "maas_training"
# Section -> (param, title, text of the field as shown, a phrase of its description).
FORM = {
    "Data": [
        ("data_path", "Data source", "", "Leave empty to train on the bundled sample"),
        ("text_col", "Text column", "text", "1 to 128 characters"),
        ("label_col", "Label column", "label", "served class names"),
        ("group_col", "Group column", "", "Optional."),
        ("id_col", "Id column", "", "ids must be unique"),
        ("label_map", "Label map", "", "RAW=NAME pairs"),
        ("max_quarantine_fraction", "Quarantine limit", "0.05", "(0 to 0.5)"),
        ("watermark_col", "Watermark column", "", "for a PostgreSQL source"),
    ],
    "Training": [
        ("epochs", "Epochs", "5", "a whole number from 1 to 50"),
        ("batch_size", "Batch size", "512", "one of 16, 32, 64, 128, 256, 512, 1024"),
        ("max_tokens", "Vocabulary size", "1000000", "500, 1,000, 2,000, 5,000"),
        ("eval_fraction", "Held-out fraction", "0.2", "0.05 to 0.5"),
    ],
    "Gate and promotion": [
        ("min_accuracy", "Minimum accuracy", "0.7", "(0 to 1)"),
        ("min_roc_auc", "Minimum ROC AUC", "", "Empty: not checked"),
        ("champion_tolerance", "Champion tolerance", "0.01", "0 to 0.2 of accuracy"),
        ("model_name", "Model name", "", "Empty: MAAS_MODEL_NAME"),
    ],
}


def open_trigger_form(page, stack):
    page.goto(f"{stack.url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger Dag", exact=True).click()
    dialog = page.locator("[role=dialog][data-state=open]")
    dialog.get_by_text(f"Trigger Dag - {DAG_ID}").wait_for()
    return dialog


def open_section(dialog, name: str):
    dialog.get_by_role("button", name=name, exact=True).click()
    # By id: the section's name ends the content's id, and aria-labelledby cannot hold a name with spaces.
    region = dialog.locator(f'[role=region][id$=":content:{name}"]')
    region.wait_for()
    return region


def field_value(region, name: str) -> str:
    """The value the form would send (a dropdown keeps its choice in a hidden input of that name)."""
    return region.locator(f"input[name=element_{name}]").input_value()


def test_the_dag_list_and_page_explain_the_pipeline(ui_page, airflow_stack):
    ui_page.goto(f"{airflow_stack.url}/dags")
    ui_page.get_by_role("link", name=DAG_ID, exact=True).first.hover()  # the list shows the summary on hover
    ui_page.get_by_text("Train a text classifier on a labeled file").first.wait_for()
    dag = airflow_stack.api("GET", f"/api/v2/dags/{DAG_ID}")
    assert "missed run is skipped" in dag["timetable_description"]
    details = airflow_stack.api("GET", f"/api/v2/dags/{DAG_ID}/details")
    assert "press **Trigger**" in details["doc_md"]


def test_the_trigger_form_shows_every_field_with_its_default_and_limits(ui_page, airflow_stack):
    dialog = open_trigger_form(ui_page, airflow_stack)
    trigger = dialog.get_by_role("button", name="Trigger", exact=True)
    assert trigger.is_enabled()  # the defaults are a valid run
    for section, fields in FORM.items():
        region = open_section(dialog, section)
        text = region.inner_text()
        for name, title, shown, phrase in fields:
            assert title in text and phrase in text, (section, name)
            assert field_value(region, name) == shown, name
        assert "This field is required" not in text
        if section == "Training":
            assert "1,000,000" in text  # the dropdown shows the vocabulary size as people write it
        if section == "Gate and promotion":
            assert "Force promotion" in text and "records that the gate was forced" in text
        if section == "Data":
            save_screenshot(ui_page, "trigger-form")
    assert trigger.is_enabled()


def test_bad_values_are_refused_in_the_form(ui_page, airflow_stack):
    runs_before = len(airflow_stack.runs(DAG_ID))
    dialog = open_trigger_form(ui_page, airflow_stack)
    trigger = dialog.get_by_role("button", name="Trigger", exact=True)

    training = open_section(dialog, "Training")
    # Whole numbers are dropdowns: there is nothing to pick outside the limits, nor a fraction.
    for typed in ("51", "1.5", "-1"):
        training.locator("#element_epochs").click()
        ui_page.keyboard.type(typed)
        ui_page.get_by_text("No options").wait_for()
        for _ in typed:  # (Escape would close the whole dialog)
            ui_page.keyboard.press("Backspace")
        fraction = training.locator("input[name=element_eval_fraction]")
        fraction.click()  # closes the menu without choosing
    assert field_value(training, "epochs") == "5"
    fraction.fill("1")
    fraction.blur()
    assert fraction.input_value() == "0.5"  # held to the stated limit

    gate = open_section(dialog, "Gate and promotion")
    accuracy = gate.locator("input[name=element_min_accuracy]")
    accuracy.fill("2")
    accuracy.blur()
    assert accuracy.input_value() == "1"
    accuracy.fill("")
    accuracy.blur()
    assert gate.get_by_text("This field is required").is_visible()
    assert trigger.is_disabled()
    save_screenshot(ui_page, "trigger-form-refuses")
    accuracy.fill("0.7")
    accuracy.blur()
    assert trigger.is_enabled()

    # A name the form cannot check itself is refused by the server before any run exists.
    gate.locator("input[name=element_model_name]").fill("bad name!")
    trigger.click()
    dialog.get_by_text("Invalid input for param model_name").wait_for()
    assert len(airflow_stack.runs(DAG_ID)) == runs_before


def test_trigger_with_the_defaults_runs_once_and_the_logs_tell_the_story(ui_page, airflow_stack):
    airflow_stack.set_paused(DAG_ID, True)
    runs_before = {run["dag_run_id"] for run in airflow_stack.runs(DAG_ID)}
    dialog = open_trigger_form(ui_page, airflow_stack)
    assert dialog.get_by_label(f"Unpause {DAG_ID} on trigger").is_checked()
    dialog.get_by_role("button", name="Trigger", exact=True).click()
    dialog.wait_for(state="hidden")

    new = [run for run in airflow_stack.runs(DAG_ID) if run["dag_run_id"] not in runs_before]
    assert [run["run_type"] for run in new] == ["manual"]
    run = airflow_stack.wait_for_run(DAG_ID, new[0]["dag_run_id"])
    assert run["state"] == "success"
    # Unpausing started no run for a missed weekly slot: this is still the only new run.
    assert len([r for r in airflow_stack.runs(DAG_ID) if r["dag_run_id"] not in runs_before]) == 1
    assert airflow_stack.api("GET", f"/api/v2/dags/{DAG_ID}")["is_paused"] is False

    train = open_task_log(ui_page, airflow_stack, run["dag_run_id"], "train_model")
    train.get_by_text(re.compile(r"epoch 1/5: loss [\d.]+, accuracy [\d.]+ \([\d.]+ s; at most \d+ s left\)")).wait_for()
    train.get_by_text(re.compile(r"trained on /CPU:0: \d+ rows, \d epoch\(s\)( \(stopped early: converged\))?, kept epoch \d, in [\d.]+ s")).wait_for()
    assert train.get_by_text("cuInit").count() == 0 and train.get_by_text("cuda drivers").count() == 0
    save_screenshot(ui_page, "train-model-log")
    evaluate = open_task_log(ui_page, airflow_stack, run["dag_run_id"], "evaluate_model")
    evaluate.get_by_text(re.compile(r"held-out metrics on \d+ rows: accuracy [\d.]+, .*log loss [\d.]+, kappa [\d.]+, ECE")).wait_for()
    evaluate.get_by_text("confusion matrix (rows: true class, columns: predicted class):").wait_for()
    evaluate.get_by_text(re.compile(r"check champion +pass: ")).wait_for()
    evaluate.get_by_text(re.compile(r"gate passed: accuracy")).wait_for()
    save_screenshot(ui_page, "evaluate-model-log")
    validate = open_task_log(ui_page, airflow_stack, run["dag_run_id"], "validate_data")
    validate.get_by_text(re.compile(r"(\d+) of \1 expectations passed")).wait_for()
    assert validate.get_by_text("Skipping registering function").count() == 0


def test_a_run_of_maas_run_has_its_task_logs_in_the_ui(ui_page, airflow_stack):
    airflow_stack.set_paused(DAG_ID, True)  # no scheduler serves it: maas run runs it in its own process
    result = airflow_stack.maas("run", "--quiet", "--param", "epochs=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "scheduler serves" not in result.stdout
    run_id = re.search(r"^run +(\S+): success$", result.stdout, re.M).group(1)
    train = open_task_log(ui_page, airflow_stack, run_id, "train_model")
    train.get_by_text(re.compile(r"epoch 2/2: loss")).wait_for()
    assert ui_page.get_by_text("Log file not found").count() == 0


def test_maas_run_hands_the_run_to_a_scheduler_that_serves_the_dag(airflow_stack):
    airflow_stack.set_paused(DAG_ID, False)
    try:
        result = airflow_stack.maas("run", "--param", "epochs=1", "--param", "min_accuracy=0.5")
    finally:
        airflow_stack.set_paused(DAG_ID, True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the Airflow scheduler serves maas_training" in result.stdout
    assert re.search(r"^  promote_model +success", result.stdout, re.M)
    run_id = re.search(r"^run +(\S+): success$", result.stdout, re.M).group(1)
    run = airflow_stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}")
    assert run["state"] == "success" and run["run_type"] == "manual"


def open_task_log(page, stack, run_id: str, task_id: str):
    """Open a task instance's page (its Logs tab shows first) and return the page."""
    page.goto(f"{stack.url}/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}/tasks/{task_id}")
    page.get_by_role("link", name="Logs", exact=True).wait_for()
    return page
