/*
 * Reads inference replies from a Kafka topic with Apache Avro's Java implementation, holding ONLY
 * the current reply schema: a reader that shares no code with the worker (tests/test_interop_readers.py).
 *
 *   java -cp 'tests/clients/java/lib/*' tests/clients/java/ReplyReader.java \
 *       BOOTSTRAP TOPIC schemas/inference_response.avsc DEADLINE_S
 *
 * It assigns every partition of TOPIC from the beginning and reads up to the end offsets it
 * finds when it starts (every record then on the topic), for at most DEADLINE_S seconds. Each
 * value goes through BinaryMessageDecoder<GenericRecord> built with that one schema (no history
 * schemas: a message with any other fingerprint throws MissingSchemaException). Output: one
 * JSON line about the reader, then one per record: the decoded reply, or "decode_error" with the
 * exception. Exit status: 0 every record read and decoded, 2 a record did not decode, 3 the
 * deadline came first.
 */

import java.io.InputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public final class ReplyReader {
  private static final HexFormat HEX = HexFormat.of();

  public static void main(String[] args) throws Exception {
    if (args.length != 4) {
      System.err.println("usage: ReplyReader BOOTSTRAP TOPIC RESPONSE_SCHEMA.avsc DEADLINE_S");
      System.exit(64);
    }
    String bootstrap = args[0];
    String topic = args[1];
    Schema schema = new Schema.Parser().parse(Path.of(args[2]).toFile());
    long deadline = System.nanoTime() + (long) (Double.parseDouble(args[3]) * 1e9);

    // The only schema this decoder knows: the current one.
    BinaryMessageDecoder<GenericRecord> decoder =
        new BinaryMessageDecoder<>(GenericData.get(), schema);
    ByteBuffer header = ByteBuffer.allocate(10).order(ByteOrder.LITTLE_ENDIAN);
    header.put((byte) 0xC3).put((byte) 0x01).putLong(SchemaNormalization.parsingFingerprint64(schema));
    System.out.println(
        "{\"reader\": \"apache-avro-java\", \"avro_version\": "
            + str(avroVersion())
            + ", \"header\": "
            + str(HEX.formatHex(header.array()))
            + "}");

    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    props.put(ConsumerConfig.CLIENT_ID_CONFIG, "reply-reader-java");
    props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    long read = 0;
    long expected = 0;
    int failed = 0;
    boolean done = false;
    try (KafkaConsumer<byte[], byte[]> consumer =
        new KafkaConsumer<>(props, new ByteArrayDeserializer(), new ByteArrayDeserializer())) {
      List<PartitionInfo> infos = consumer.partitionsFor(topic, Duration.ofSeconds(30));
      if (infos == null || infos.isEmpty()) {
        System.err.println("ReplyReader: topic " + topic + " has no partitions");
        System.exit(3);
      }
      List<TopicPartition> partitions = new ArrayList<>();
      for (PartitionInfo info : infos) {
        partitions.add(new TopicPartition(topic, info.partition()));
      }
      consumer.assign(partitions);
      consumer.seekToBeginning(partitions);
      Map<TopicPartition, Long> ends = consumer.endOffsets(partitions, Duration.ofSeconds(30));
      for (TopicPartition tp : partitions) {
        expected += ends.get(tp) - consumer.beginningOffsets(List.of(tp)).get(tp);
      }
      while (!done && System.nanoTime() < deadline) {
        for (ConsumerRecord<byte[], byte[]> record : consumer.poll(Duration.ofMillis(200))) {
          read++;
          String where =
              "\"partition\": " + record.partition() + ", \"offset\": " + record.offset() + ", ";
          try {
            GenericRecord reply = decoder.decode(record.value());
            System.out.println("{" + where + reply(reply) + "}");
          } catch (Exception e) {
            failed++;
            System.out.println(
                "{" + where + "\"decode_error\": " + str(e.getClass().getName() + ": " + e.getMessage()) + "}");
          }
        }
        done = true;
        for (TopicPartition tp : partitions) {
          done &= consumer.position(tp) >= ends.get(tp);
        }
      }
    }
    System.out.flush();
    System.err.println("ReplyReader: " + read + " of " + expected + " records read, " + failed + " not decoded");
    System.exit(failed > 0 ? 2 : done ? 0 : 3);
  }

  private static String avroVersion() throws Exception {
    try (InputStream in =
        Schema.class.getResourceAsStream("/META-INF/maven/org.apache.avro/avro/pom.properties")) {
      if (in == null) {
        return "unknown";
      }
      Properties props = new Properties();
      props.load(in);
      return props.getProperty("version", "unknown");
    }
  }

  /** The reply's fields as JSON members (no braces). */
  private static String reply(GenericRecord r) throws Exception {
    StringBuilder out = new StringBuilder();
    out.append("\"id\": ").append(str(r.get("id")));
    out.append(", \"model_name\": ").append(str(r.get("model_name")));
    out.append(", \"model_version\": ").append(str(r.get("model_version")));
    out.append(", \"outputs\": [");
    List<?> outputs = (List<?>) r.get("outputs");
    for (int i = 0; i < outputs.size(); i++) {
      out.append(i == 0 ? "" : ", ").append(tensor((GenericRecord) outputs.get(i)));
    }
    out.append("]");
    GenericRecord error = (GenericRecord) r.get("error");
    out.append(", \"error\": ")
        .append(error == null ? "null"
            : "{\"code\": " + str(error.get("code")) + ", \"message\": " + str(error.get("message")) + "}");
    GenericRecord timing = (GenericRecord) r.get("timing");
    out.append(", \"timing\": ")
        .append(timing == null ? "null"
            : "{\"queue_us\": " + timing.get("queue_us") + ", \"compute_us\": " + timing.get("compute_us")
                + ", \"batch_size\": " + timing.get("batch_size") + "}");
    Map<?, ?> parameters = (Map<?, ?>) r.get("parameters");
    out.append(", \"parameters\": ");
    if (parameters == null) {
      out.append("null");
    } else {
      out.append("{");
      String sep = "";
      for (Map.Entry<?, ?> entry : parameters.entrySet()) {
        out.append(sep).append(str(entry.getKey())).append(": ").append(parameter(entry.getValue()));
        sep = ", ";
      }
      out.append("}");
    }
    return out.toString();
  }

  /** A parameter value with the union branch it was written as (doubles as their exact bits). */
  private static String parameter(Object value) {
    if (value instanceof Boolean b) {
      return "{\"type\": \"boolean\", \"value\": " + b + "}";
    }
    if (value instanceof Long l) {
      return "{\"type\": \"long\", \"value\": " + l + "}";
    }
    if (value instanceof Double d) {
      return "{\"type\": \"double\", \"bits\": " + str(String.format("%016x", Double.doubleToRawLongBits(d))) + "}";
    }
    if (value instanceof CharSequence s) {
      return "{\"type\": \"string\", \"value\": " + str(s) + "}";
    }
    return "{\"type\": " + str(value.getClass().getName()) + "}";
  }

  private static String tensor(GenericRecord t) throws Exception {
    ByteBuffer buffer = ((ByteBuffer) t.get("data")).duplicate();
    byte[] data = new byte[buffer.remaining()];
    buffer.get(data);
    StringBuilder shape = new StringBuilder("[");
    List<?> dims = (List<?>) t.get("shape");
    for (int i = 0; i < dims.size(); i++) {
      shape.append(i == 0 ? "" : ", ").append((Long) dims.get(i));
    }
    shape.append("]");
    String datatype = t.get("datatype").toString();
    String out = "{\"name\": " + str(t.get("name")) + ", \"datatype\": " + str(datatype)
        + ", \"shape\": " + shape + ", \"length\": " + data.length
        + ", \"sha256\": " + str(HEX.formatHex(MessageDigest.getInstance("SHA-256").digest(data)));
    if (datatype.equals("BYTES")) {
      out += ", \"elements\": " + elements(data);
    }
    return out + "}";
  }

  /** A BYTES tensor's elements (4-byte little-endian length, then bytes) as hex; null if malformed. */
  private static String elements(byte[] data) {
    ByteBuffer in = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN);
    StringBuilder out = new StringBuilder("[");
    String sep = "";
    while (in.hasRemaining()) {
      if (in.remaining() < 4) {
        return "null";
      }
      int size = in.getInt();
      if (size < 0 || size > in.remaining()) {
        return "null";
      }
      byte[] element = new byte[size];
      in.get(element);
      out.append(sep).append(str(HEX.formatHex(element)));
      sep = ", ";
    }
    return out.append("]").toString();
  }

  /** A JSON string (ASCII only: everything else as \\u escapes), or null. */
  private static String str(Object value) {
    if (value == null) {
      return "null";
    }
    String s = value.toString();
    StringBuilder out = new StringBuilder(s.length() + 2).append('"');
    for (int i = 0; i < s.length(); i++) {
      char c = s.charAt(i);
      if (c == '"' || c == '\\') {
        out.append('\\').append(c);
      } else if (c < 0x20 || c > 0x7e) {
        out.append(String.format("\\u%04x", (int) c));
      } else {
        out.append(c);
      }
    }
    return out.append('"').toString();
  }
}
