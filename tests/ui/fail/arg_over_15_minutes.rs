use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

#[deferred_handler(flush_timeout = "15m 1s")]
async fn just_over(event: LambdaEvent<()>) {
    let _ = event;
}

#[deferred_handler(flush_timeout = "1h")]
async fn hour(event: LambdaEvent<()>) {
    let _ = event;
}

// humantime's own arithmetic overflows here (a panic inside it): still this error.
#[deferred_handler(flush_timeout = "18446744073709551615s 500ms 500ms")]
async fn overflowing(event: LambdaEvent<()>) {
    let _ = event;
}

fn main() {}
