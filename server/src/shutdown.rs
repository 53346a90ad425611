//! A one-shot cancellation signal: SIGTERM/SIGINT fire it; the gRPC server, the operations
//! port and the background tasks stop on it (stop accepting, drain, then cancel the rest).
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct CancelToken {
    tx: Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for CancelToken {
    fn default() -> Self {
        let (tx, rx) = watch::channel(false);
        CancelToken { tx: Arc::new(tx), rx }
    }
}

impl CancelToken {
    pub fn cancel(&self) {
        let _ = self.tx.send(true);
    }

    pub async fn cancelled(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|v| *v).await;
    }
}
