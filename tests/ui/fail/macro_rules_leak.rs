//! A body written by a `macro_rules!` does not see an event name that came from the macro's
//! caller (hygiene), with the attribute as without it: the error is the plain "cannot find".
use deferred_core::deferred_handler;
use lambda_runtime::LambdaEvent;

macro_rules! leak {
    ($name:ident, $event:ident) => {
        #[deferred_handler]
        pub async fn $name($event: LambdaEvent<u8>) -> u8 {
            ev.payload
        }
    };
}

leak!(handler, ev);

fn main() {}
