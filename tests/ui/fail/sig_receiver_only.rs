use deferred_core::deferred_handler;

struct Handler;

impl Handler {
    #[deferred_handler]
    async fn handle(&self) -> u8 {
        1
    }
}

fn main() {}
