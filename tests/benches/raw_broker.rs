//! The raw broker peer of the fleet benchmarks: QoS 1 messages of a given
//! size from one publisher to one subscriber through the same broker, with
//! rumqttc as the appliances and the ingest use it.

use std::time::Instant;

/// Messages per second from one QoS 1 publisher to one QoS 1 subscriber.
pub fn raw_broker_rate(
    port: u16,
    subscriber: (&str, &str),
    publisher: (&str, &str),
    device: &str,
    messages: usize,
    bytes: usize,
) -> f64 {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let topic = format!("rxv/v1/dev/{device}/telemetry");
        let mut sub = MqttOptions::new("bench-raw-sub", "127.0.0.1", port);
        sub.set_credentials(subscriber.0, subscriber.1);
        sub.set_max_packet_size(1 << 20, 1 << 20);
        let (sub_client, mut sub_events) = AsyncClient::new(sub, 10_000);
        sub_client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = sub_events.poll().await {
                break;
            }
        }
        let publisher_account = publisher;
        let mut publisher = MqttOptions::new("bench-raw-pub", "127.0.0.1", port);
        publisher.set_credentials(publisher_account.0, publisher_account.1);
        publisher.set_max_packet_size(1 << 20, 1 << 20);
        publisher.set_inflight(1000);
        let (pub_client, mut pub_events) = AsyncClient::new(publisher, 10_000);
        let payload = vec![b'x'; bytes];
        let started = Instant::now();
        let sender = tokio::spawn(async move {
            for _ in 0..messages {
                pub_client.publish(&topic, QoS::AtLeastOnce, false, payload.clone()).await.unwrap();
            }
            pub_client
        });
        tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });
        let mut received = 0;
        while received < messages {
            if let Ok(Event::Incoming(Packet::Publish(_))) = sub_events.poll().await {
                received += 1;
            }
        }
        let rate = messages as f64 / started.elapsed().as_secs_f64();
        let _ = sender.await;
        rate
    })
}
