//! 202 Accepted: take a payment instruction, answer at once, validate it after the response.
//!
//! `POST /payments` with `{"debtor_account": "ACC-1", "creditor_name": "Acme Ltd",
//! "creditor_iban": "DE89370400440532013000", "amount_cents": 125000}` stores the instruction
//! and answers `202 Accepted` with its id. The validation pipeline then runs after the
//! response, as ordered `defer!` actions: sanction screening, balance check, notification.
//! A step that rejects the payment returns `Err`: the deferred phase's report (logged at
//! `warn`) names the step and its error, and the later steps still run; here the balance check
//! skips a rejected payment and the notification reports the outcome either way.
//!
//! The store, the sanctions list, the balances and the notifier are in-memory stand-ins.
//!
//! Deferred work runs after the answer: an environment that dies before its phase ends (a
//! crash, the invocation's deadline) takes the rest of the pipeline with it. The phase's
//! report says what was cut, but nothing runs it again. For money, persist the instruction
//! (done here, in the stand-in store) and have a re-drive, a queue or a sweeper, pick up a
//! payment left `Received`; the deferred pipeline is the fast path.
//!
//! Run its tests (the handler called directly: with no `Deferred` started, the actions run
//! inline before the handler returns, so the tests can check their effect):
//!
//! ```text
//! cargo test -p examples --bin wire_validation
//! ```
//!
//! Build and deploy it as `api_handler` explains (`--bin wire_validation`), behind an API
//! Gateway route. The function timeout must cover the pipeline: the actions get what is left
//! before the deadline, less a 100 ms margin.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use deferred_core::{Deferred, defer, deferred_handler};
use lambda_http::http::Method;
use lambda_http::http::StatusCode;
use lambda_http::{
    Adapter, Body, Error, Request, RequestExt, RequestPayloadExt, Response, service_fn,
};
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Clone, Deserialize)]
struct Instruction {
    debtor_account: String,
    creditor_name: String,
    creditor_iban: String,
    amount_cents: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Received,
    Screened,
    Funded,
    Rejected(String),
}

#[derive(Debug, Clone)]
struct Payment {
    instruction: Instruction,
    status: Status,
}

/// The payment store: a stand-in for a database table.
static PAYMENTS: LazyLock<Mutex<HashMap<String, Payment>>> = LazyLock::new(Default::default);
/// What the payer was told, by payment id: a stand-in for the webhook's receiver.
static NOTIFIED: LazyLock<Mutex<HashMap<String, String>>> = LazyLock::new(Default::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn payments() -> MutexGuard<'static, HashMap<String, Payment>> {
    PAYMENTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn payment(id: &str) -> Option<Payment> {
    payments().get(id).cloned()
}

fn set_status(id: &str, status: Status) {
    if let Some(payment) = payments().get_mut(id) {
        payment.status = status;
    }
}

#[tracing::instrument(skip_all)]
#[deferred_handler]
async fn handler(request: Request) -> Result<Response<Body>, Error> {
    if request.method() != Method::POST || request.raw_http_path() != "/payments" {
        return respond(StatusCode::NOT_FOUND, json!({ "error": "no such route" }));
    }
    // Only the cheap checks run before the answer.
    let instruction = match request.payload::<Instruction>() {
        Ok(Some(i)) if i.amount_cents > 0 && (15..=34).contains(&i.creditor_iban.len()) => i,
        _ => {
            let error = json!({ "error": "not a valid payment instruction" });
            return respond(StatusCode::BAD_REQUEST, error);
        }
    };
    let id = format!("pay-{:06}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    payments().insert(
        id.clone(),
        Payment {
            instruction,
            status: Status::Received,
        },
    );

    // After the response, one by one, in this order, each named in the phase's report.
    defer!("sanction screening", screen(id.clone()));
    defer!("balance check", check_balance(id.clone()));
    defer!("notify", notify(id.clone()));

    respond(
        StatusCode::ACCEPTED,
        json!({ "id": id, "status": "accepted" }),
    )
}

/// Rejects a payment to a sanctioned party.
#[tracing::instrument]
async fn screen(id: String) -> Result<(), String> {
    let creditor = payment(&id)
        .ok_or_else(|| format!("{id}: no such payment"))?
        .instruction
        .creditor_name;
    tokio::time::sleep(Duration::from_millis(40)).await; // a screening API call
    if SANCTIONED.contains(&creditor.as_str()) {
        set_status(&id, Status::Rejected("sanctioned creditor".into()));
        return Err(format!(
            "{id}: creditor {creditor:?} is on the sanctions list"
        ));
    }
    set_status(&id, Status::Screened);
    Ok(())
}

/// Rejects a payment the debtor cannot cover; leaves a rejected one alone.
#[tracing::instrument]
async fn check_balance(id: String) -> Result<(), String> {
    let Some(Payment {
        instruction,
        status: Status::Screened,
    }) = payment(&id)
    else {
        return Ok(()); // rejected (or gone) already: nothing to check
    };
    tokio::time::sleep(Duration::from_millis(20)).await; // a core-banking API call
    let balance = BALANCES
        .iter()
        .find(|(account, _)| *account == instruction.debtor_account)
        .map_or(0, |(_, cents)| *cents);
    if instruction.amount_cents > balance {
        set_status(&id, Status::Rejected("insufficient funds".into()));
        return Err(format!(
            "{id}: {} cents requested, {balance} available on {}",
            instruction.amount_cents, instruction.debtor_account
        ));
    }
    set_status(&id, Status::Funded);
    Ok(())
}

/// Tells the payer how it went (a webhook, an e-mail…).
#[tracing::instrument]
async fn notify(id: String) {
    let outcome = match payment(&id).map(|p| p.status) {
        Some(Status::Funded) => "released for execution".to_owned(),
        Some(Status::Rejected(why)) => format!("rejected: {why}"),
        other => format!("left in state {other:?}"),
    };
    tracing::info!(payment = %id, %outcome, "payer notified");
    NOTIFIED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(id, outcome);
}

const SANCTIONED: &[&str] = &["Evil Corp"];
const BALANCES: &[(&str, u64)] = &[("ACC-1", 5_000_000), ("ACC-2", 10_000)];

fn respond(status: StatusCode, body: serde_json::Value) -> Result<Response<Body>, Error> {
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .without_time()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    Deferred::new()
        .run(Adapter::from(service_fn(handler)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: &str) -> Option<Status> {
        payment(id).map(|p| p.status)
    }

    /// What the payer of `id` was told, if anything.
    fn notified(id: &str) -> Option<String> {
        NOTIFIED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(id)
            .cloned()
    }

    fn request(method: &str, path: &str, body: String) -> Request {
        lambda_http::http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("a valid request")
            .with_raw_http_path(path)
    }

    async fn submit(debtor: &str, creditor: &str, cents: u64) -> (StatusCode, String) {
        let body = json!({
            "debtor_account": debtor,
            "creditor_name": creditor,
            "creditor_iban": "DE89370400440532013000",
            "amount_cents": cents,
        });
        let response = handler(request("POST", "/payments", body.to_string()))
            .await
            .expect("the handler answers");
        let Body::Text(text) = response.body() else {
            panic!("a text body");
        };
        let answer: serde_json::Value = serde_json::from_str(text).expect("JSON");
        let id = answer["id"].as_str().unwrap_or_default().to_owned();
        (response.status(), id)
    }

    #[tokio::test]
    async fn accepted_then_validated() {
        let (code, id) = submit("ACC-1", "Acme Ltd", 125_000).await;
        assert_eq!(code, StatusCode::ACCEPTED);
        assert_eq!(status(&id), Some(Status::Funded));
        assert_eq!(notified(&id).as_deref(), Some("released for execution"));
    }

    #[tokio::test]
    async fn a_failed_step_does_not_stop_the_later_ones() {
        let (code, id) = submit("ACC-1", "Evil Corp", 100).await;
        assert_eq!(code, StatusCode::ACCEPTED);
        assert_eq!(
            status(&id),
            Some(Status::Rejected("sanctioned creditor".into()))
        );
        // The steps after the failed one ran: the payer was told.
        assert_eq!(
            notified(&id).as_deref(),
            Some("rejected: sanctioned creditor")
        );

        let (_, id) = submit("ACC-2", "Acme Ltd", 20_000).await;
        assert_eq!(
            status(&id),
            Some(Status::Rejected("insufficient funds".into()))
        );
        assert_eq!(
            notified(&id).as_deref(),
            Some("rejected: insufficient funds")
        );
    }

    #[tokio::test]
    async fn not_an_instruction() {
        let response = handler(request("POST", "/payments", "{}".into()))
            .await
            .expect("the handler answers");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn only_post_payments_is_a_route() {
        let body = json!({
            "debtor_account": "ACC-1",
            "creditor_name": "Acme Ltd",
            "creditor_iban": "DE89370400440532013000",
            "amount_cents": 100,
        })
        .to_string();
        for (method, path) in [("PUT", "/payments"), ("POST", "/anything")] {
            let response = handler(request(method, path, body.clone()))
                .await
                .expect("the handler answers");
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method} {path}");
        }
    }
}
