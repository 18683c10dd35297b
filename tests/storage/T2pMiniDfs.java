// A real HDFS for the test suite: Hadoop's own MiniDFSCluster (NameNode + DataNodes in this JVM) on 127.0.0.1.
// Prints "T2P_HDFS_URI hdfs://127.0.0.1:<port>" once serving, and shuts the cluster down when stdin closes.
// Usage: java -cp <hadoop-client-minicluster classpath>:<dir> T2pMiniDfs <base dir> <datanodes>
import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.hdfs.MiniDFSCluster;

public class T2pMiniDfs {
    public static void main(String[] args) throws Exception {
        Configuration conf = new Configuration();
        conf.set(MiniDFSCluster.HDFS_MINIDFS_BASEDIR, args[0]);
        conf.set("dfs.permissions.enabled", "false");
        MiniDFSCluster cluster = new MiniDFSCluster.Builder(conf)
            .numDataNodes(Integer.parseInt(args[1])).nameNodePort(0).build();
        cluster.waitActive();
        System.out.println("T2P_HDFS_URI hdfs://127.0.0.1:" + cluster.getNameNodePort());
        System.out.flush();
        while (System.in.read() != -1) { }
        cluster.shutdown();
    }
}
