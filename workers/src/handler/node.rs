//! An attempt on a remote node: the node relays the answer itself; the request's frames
//! and tally take over what it reports, and the request ends as for any channel.

use router::Attempt;

use super::attempt::{Answer, AttemptEnd};
use super::Request;
use crate::node::dispatch::{Dispatch, DispatchEnd};
use crate::tally::Tally;

impl Request<'_> {
    pub(super) async fn node_attempt(
        &mut self,
        attempt: &Attempt,
        tally: &mut Tally,
    ) -> AttemptEnd {
        let dispatch = Dispatch {
            nats: &self.ctx.nats,
            ns: &self.ctx.ns,
            chunks: &self.ctx.chunks,
            abort: &self.ctx.abort,
            cancel: &self.cancel,
        };
        let end = dispatch
            .call(
                &attempt.channel,
                &attempt.upstream_model,
                self.item,
                &mut self.frames,
                tally,
                self.deadline,
            )
            .await;
        match end {
            DispatchEnd::Done => AttemptEnd::Done(Answer::Relayed),
            DispatchEnd::Failed(e) => AttemptEnd::Failed(e),
            DispatchEnd::Aborted => AttemptEnd::Aborted,
            // The node already put the stream's closing frames in `frames`.
            DispatchEnd::Cancelled => AttemptEnd::Cancelled(None),
        }
    }
}
