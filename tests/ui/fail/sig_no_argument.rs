use deferred_core::deferred_handler;

#[deferred_handler]
async fn handler() -> u8 {
    1
}

fn main() {}
